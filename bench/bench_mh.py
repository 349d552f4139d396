"""Reward reached per forward-pass token: MH (suffix proposal) vs SMC vs best-of-n, default model.

Every model call is counted by a forward pre-hook (tokens = ``input_ids.numel()``: prompt
encodes with their padding, decoding steps, and MH's one re-fed token per truncation), so the
three methods are compared on the same budget of tokens pushed through the model:

* MH: ``--chains`` chains per prompt, ``steps`` suffix steps; its token count sets the budget.
* best-of-n: ``--chains`` outputs, ``best_of`` = k chosen so that n·k prior draws match the budget.
* SMC (bootstrap, resampling at ESS < N/2): N particles chosen to match the budget.

Rewards: MH and SMC estimate E_pi*[r] (uniform mean of the final states; SMC's weighted mean);
best-of-n reports the mean reward of its n outputs (it targets the best-of-k distribution, not
pi*). Also printed: MH's mean reward after each step against the tokens spent so far.

    python bench/bench_mh.py [--steps 4,16] [--chains 8] [--max-new-tokens 24] [--beta 0.1]
"""

from __future__ import annotations

import argparse
import time

import torch

import posterior as pst
from posterior.samplers import SAMPLERS, mh


class TokenCounter:
    """Counts tokens fed to ``model`` (every forward call) while installed."""

    def __init__(self, model):
        self.tokens = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += int(ids.numel())

    def take(self) -> int:
        t, self.tokens = self.tokens, 0
        return t


def run(post, counter, method, prompt, n, max_new_tokens, seed, **options):
    counter.take()
    t0 = time.perf_counter()
    res = post.sample(n=n, method=method, max_new_tokens=max_new_tokens, prompts=[prompt], seed=seed, **options)
    return res, counter.take(), time.perf_counter() - t0


def mh_curve(post, counter, prompt, n, max_new_tokens, steps, seed):
    """Mean reward of the chains after each step against cumulative forward tokens (init + step API)."""
    prior = post.prior
    g = torch.Generator(device=prior.device).manual_seed(seed)
    ids = prior.encode_prompts([prompt])
    rows = [ids[0]] * n
    cfg = mh.MHConfig(max_new_tokens=max_new_tokens, move="suffix")
    counter.take()
    state = mh.init(post, ids, n, max_new_tokens=max_new_tokens, generator=g)
    points = [(counter.tokens, float(state.rewards.mean()))]
    for _ in range(steps):
        state, _ = mh.step(post, rows, state, config=cfg, generator=g)
        points.append((counter.tokens, float(state.rewards.mean())))
    counter.take()
    return points


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", default="The movie was")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--chains", type=int, default=8, help="MH chains = best-of-n outputs")
    ap.add_argument("--steps", default="4,16", help="MH steps per budget, comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prior = pst.load_default_prior(device=args.device)
    post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=args.beta)
    counter = TokenCounter(prior.model)
    n, M = args.chains, args.max_new_tokens
    have_smc = "smc" in SAMPLERS
    if not have_smc:
        print("method='smc' is not registered yet: skipping SMC")

    # tokens per prior draw (prompt encode amortised), to size best-of-n and SMC to the budget
    _, pilot_tokens, _ = run(post, counter, "bon", args.prompt, 32, M, args.seed + 1, best_of=1)
    per_draw = pilot_tokens / 32

    print(f"prompt={args.prompt!r} beta={args.beta} max_new_tokens={M} threads={torch.get_num_threads()} "
          f"device={prior.device}; prior draw ≈ {per_draw:.1f} forward tokens")
    header = f"{'budget':>7} {'method':<7} {'config':<26} {'fwd tokens':>10} {'reward':>8} {'reward/ktok':>11} {'best':>6} {'sec':>7}"
    print(header)
    print("-" * len(header))
    for steps in [int(s) for s in args.steps.split(",")]:
        res, tok, sec = run(post, counter, "mh", args.prompt, n, M, args.seed, steps=steps, move="suffix")
        budget = tok
        rows = [("mh", f"n={n} steps={steps} acc={float(res.info['acceptance_rate'][0]):.2f}", res, tok, sec)]
        k = max(1, round(budget / (n * per_draw)))
        res_b, tok_b, sec_b = run(post, counter, "bon", args.prompt, n, M, args.seed, best_of=k)
        rows.append(("bon", f"n={n} best_of={k}", res_b, tok_b, sec_b))
        if have_smc:
            N = max(2, round(budget / per_draw))
            res_s, tok_s, sec_s = run(post, counter, "smc", args.prompt, N, M, args.seed)
            rows.append(("smc", f"N={N} ess={float(res_s.ess[0]):.1f}", res_s, tok_s, sec_s))
        for method, cfg, r, t, s in rows:
            reward = float(r.reward_mean()[0]) if r.targets_posterior else float(r.rewards[0].mean())
            print(f"{budget:>7} {method:<7} {cfg:<26} {t:>10} {reward:>8.3f} {1000 * reward / t:>11.3f} "
                  f"{float(r.rewards[0].max()):>6.3f} {s:>7.1f}")
    steps = max(int(s) for s in args.steps.split(","))
    curve = mh_curve(post, counter, args.prompt, n, M, steps, args.seed)
    print("\nMH (suffix) mean chain reward vs cumulative forward tokens:")
    print("  " + "  ".join(f"{t}:{r:.3f}" for t, r in curve))


if __name__ == "__main__":
    main()
