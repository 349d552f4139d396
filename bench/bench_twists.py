"""Learned twist vs reward-as-twist vs bootstrap on the default model (issue 15, part 3).

Setting: SmolLM2-135M-Instruct (``pst.load_default_prior()``), Sentiment (VADER) reward, beta = 0.1,
prompt "The movie was", N = 32 particles x T = 32 tokens, ess_threshold 0.5, systematic resampling.

1. Train a head twist (``pst.twists.learned(prior)``: :class:`posterior.twists.head.HeadTwist`)
   with ``pst.train.fit(post, twist, objective=..., steps=S, batch_size=B, max_new_tokens=32)``;
   its wall time is printed; the twist is saved to ``--save`` (default /tmp/head_twist).
2. SMC with the bootstrap proposal at equal sampled tokens (every run: N x T), over ``--seeds``
   seeds, with ``twist=None`` (bootstrap: the reward only at the end), ``twist="auto"`` (the
   reward on partial texts, ``from_reward``) and ``twist=head``: mean ESS over steps, final ESS,
   number of resampling steps, sd of log Ẑ over seeds, weighted reward mean, seconds.
3. The tilted proposal: ``proposal="tilted"`` with ``twist=from_reward`` (``lookahead=8`` pi0
   candidates per particle and step, each scored by the reward) against ``twist=head`` (dense
   values: one (B, H)·(H, V) product per step, the exact locally optimal proposal over all V
   tokens). Same table, plus the ratio of median times.

Runs alternate between configurations seed by seed (seed-major), so a change in machine load hits
all configurations alike; times are medians. Run with OMP_NUM_THREADS=1:

    OMP_NUM_THREADS=1 python bench/bench_twists.py [--objective regression] [--steps 8]
        [--batch-size 16] [--lr 3e-3] [--seeds 8] [--load PATH]

Measured 2026-12-03 on the shared 2-core machine, heavily loaded (load average 9-15 from other
jobs; a second bench ran alongside part of the time), 1 thread, float32. Head: full-rank W.

Training (``pst.train.fit``, one prompt, max_new_tokens 32, each step = 16 prior rollouts + one
teacher-forced pass): "regression" (exp-domain least squares to psi*), 8 steps x 16, lr 3e-3:
302 s wall (5.0 min); "fudge" (least squares to r), 8 steps x 16, lr 1e-3: 523 s wall (8.7 min).

    configuration (8 seeds)              mean ESS  final ESS  resamp.  sd logZ  mean logZ  reward         median s
    bootstrap (twist=None)                 32.0*      4.3      0.0     0.595     6.220    0.802 ± 0.027   48.3
    reward-as-twist (auto)                 21.0      21.8      6.0     1.206     4.930    0.808 ± 0.023   47.0
    head twist, regression 5 min           12.4       5.7     23.6     1.947     5.550    0.747 ± 0.040   57.1
    head twist, fudge 8.7 min              20.0       3.4      2.2     0.991     6.048    0.771 ± 0.046   54.6
    tilted, from_reward, lookahead 8       22.1      22.5      5.4     1.011     5.512    0.835 ± 0.011   53.3
    tilted, head (dense), regression       13.4       2.7     22.0     2.850     4.358    0.601 ± 0.086   71.1
    tilted, head (dense), fudge            16.0       5.1     14.1     2.237     5.913    0.723 ± 0.051   50.7

    * untwisted: the weights change only at the end, so the per-step ESS is N until the last step.

(The two head rows come from two runs of this script; the other rows from the regression run.)
After 5-9 CPU minutes (128 rollouts) the head is not yet a good twist: the regression head
resamples at 2/3 of the steps and has the largest log Ẑ spread; the fudge head is better than
the reward-as-twist on log Ẑ spread (0.99 vs 1.21) but not than the bootstrap (0.60). At beta =
0.1 a twist error of 0.1 in psi is a factor e in the weights, so a twist must be accurate to a few
hundredths of a reward unit before it helps; the reward on partial texts has the highest reward
mean and ESS here.

Tilted proposal, time: dense head values vs lookahead-8 reward calls, per step at B = 32
(medians): the prior's decoding step (with hidden states) 1361 ms, the head's dense (B, V) values
343 ms, decoding + VADER of 8 x 32 candidate texts 81 ms. Whole runs, head (dense) / from_reward:
median 1.36 (per seed 1.38, 1.36, 1.07, 2.30, 1.35, 1.14, 1.38, 0.54). The dense values cost one
(B, H)·(H, V) product, as much as the prior's own output layer; VADER is cheap enough that its 8
calls cost less. The dense head does buy the exact locally optimal proposal over all V tokens.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import posterior as pst

PROMPT = "The movie was"
BETA = 0.1
N, T = 32, 32


def summarize(res) -> dict:
    """Per-run figures of one prompt's SMC result."""
    w = res.log_weights[0].double().softmax(0)
    rewards = res.rewards[0].double()
    finite = torch.isfinite(rewards)
    info = res.info
    ess_steps = _info(info, "ess_per_step")
    resampled = _info(info, "resampled")
    return {
        "log_Z": float(res.log_Z[0]),
        "ess_final": float(res.ess[0]),
        "ess_mean": float(ess_steps[0].double().mean()) if ess_steps is not None else float("nan"),
        "resamples": int(resampled[0].sum()) if resampled is not None else -1,
        "reward": float((w[finite] * rewards[finite]).sum() / w[finite].sum()),
        "tokens": int(res.lengths[0].sum()) if getattr(res, "lengths", None) is not None else -1,
    }


def _info(info, name):
    if info is None:
        return None
    if isinstance(info, dict):
        return info.get(name)
    return getattr(info, name, None)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def per_step_costs(prior, reward, head, repeats: int = 7) -> dict:
    """One SMC step's parts at B = N rows, prefixes of 16 tokens: the prior's decoding step
    (keeping hidden states), the head's dense values, and the lookahead's reward calls (decode
    and score 8 candidate texts per row). Alternated, medians."""
    from posterior.twists.base import Prefixes

    g = torch.Generator().manual_seed(0)
    ids = prior.encode_prompts([PROMPT])
    state = prior.start(ids, copies=N, hidden=True)
    for _ in range(16):
        state = prior.extend(state, torch.multinomial(state.logprobs.exp(), 1, generator=g).squeeze(1))
    prefixes = torch.randint(100, 20000, (N, 16), generator=g)
    x = Prefixes(prompt_ids=ids * N, tokens=prefixes, lengths=torch.full((N,), 16), prompt_index=torch.zeros(N, dtype=torch.long),
                 decode=prior.decode, eos_token_ids=prior.eos_token_ids, hidden=state.hidden)  # fmt: skip
    cand = torch.multinomial(state.logprobs.exp(), 8, generator=g)  # (N, 8)
    step_tok = cand[:, 0]

    def lookahead_rewards():
        texts = [prior.decode(prefixes[b].tolist() + [int(v)]) for b in range(N) for v in cand[b]]
        return reward(texts)

    out = {"extend": [], "head": [], "lookahead": []}
    for _ in range(repeats):
        s2 = prior.select(state, torch.arange(N))
        out["extend"].append(_median_time(lambda: prior.extend(s2, step_tok), 1))
        out["head"].append(_median_time(lambda: head.next_values(x), 1))
        out["lookahead"].append(_median_time(lookahead_rewards, 1))
    return {k: statistics.median(v) for k, v in out.items()}


def train_head(post, args):
    twist = pst.twists.learned(post.prior, max_new_tokens=T)
    t0 = time.perf_counter()
    run = pst.train.fit(post, twist, objective=args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        max_new_tokens=T, prompts=[PROMPT], seed=0)  # fmt: skip
    seconds = time.perf_counter() - t0
    twist.save(args.save)
    return twist, run, seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objective", default="regression", help="fit objective for the head: ctl | regression | fudge")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--save", default="/tmp/head_twist")
    ap.add_argument("--load", default=None, help="a saved head twist: skip training")
    ap.add_argument("--skip", default="", help="comma-separated configurations to skip")
    args = ap.parse_args(argv)

    print(f"threads {torch.get_num_threads()}; the machine is shared and loaded: times are medians of alternated runs")
    t0 = time.perf_counter()
    prior = pst.load_default_prior()
    reward = pst.rewards.Sentiment()
    post = pst.Posterior(prior, reward, beta=BETA)
    print(f"loaded the default model in {time.perf_counter() - t0:.1f} s")

    if args.load:
        head = pst.twists.load(args.load, prior)
        print(f"loaded head twist from {args.load}")
    else:
        head, run, secs = train_head(post, args)
        print(f"trained head twist: objective={args.objective}, {args.steps} steps x batch {args.batch_size}, lr {args.lr}: "
              f"{secs:.0f} s wall ({secs / 60:.1f} CPU min on 1 thread); saved to {args.save}")  # fmt: skip
        rows = getattr(run, "metrics", None) or getattr(run, "history", None)
        if rows:
            print("  first / last training rows:", rows[0], rows[-1], sep="\n  ")

    costs = per_step_costs(prior, reward, head)
    print(f"per SMC step at B={N} (medians): prior decoding step with hidden states {costs['extend'] * 1e3:.0f} ms; "
          f"head dense values (B, V) {costs['head'] * 1e3:.0f} ms; lookahead 8 (decode + VADER on {8 * N} texts) "
          f"{costs['lookahead'] * 1e3:.0f} ms")  # fmt: skip

    from_reward = pst.twists.from_reward(reward)
    configs = {
        "bootstrap (twist=None)": dict(proposal="bootstrap", twist=None),
        "reward-as-twist (auto)": dict(proposal="bootstrap", twist="auto"),
        "head twist": dict(proposal="bootstrap", twist=head),
        "tilted, from_reward, lookahead 8": dict(proposal="tilted", twist=from_reward, lookahead=8),
        "tilted, head (dense)": dict(proposal="tilted", twist=head),
    }
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    configs = {k: v for k, v in configs.items() if not any(s in k for s in skip)}
    results: dict[str, list[dict]] = {k: [] for k in configs}
    for seed in range(args.seeds):
        for name, opts in configs.items():
            t = time.perf_counter()
            res = post.sample(n=N, method="smc", max_new_tokens=T, prompts=[PROMPT], seed=seed, ess_threshold=0.5, **opts)
            row = summarize(res)
            row["seconds"] = time.perf_counter() - t
            results[name].append(row)
            print(f"  seed {seed} {name:34s} log_Z {row['log_Z']:8.3f} ess_mean {row['ess_mean']:5.1f} "
                  f"resamples {row['resamples']:3d} reward {row['reward']:6.3f} {row['seconds']:6.1f} s", flush=True)  # fmt: skip

    print(f"\nN={N} x T={T}, beta={BETA}, Sentiment, prompt {PROMPT!r}, {args.seeds} seeds")
    head_line = f"{'configuration':34s} {'mean ESS':>8s} {'final ESS':>9s} {'resamp.':>7s} {'sd logZ':>7s} {'mean logZ':>9s} {'reward':>13s} {'median s':>8s}"
    print(head_line)
    print("-" * len(head_line))
    for name, rows in results.items():
        lz = [r["log_Z"] for r in rows]
        rw = [r["reward"] for r in rows]
        sd = statistics.stdev(lz) if len(lz) > 1 else float("nan")
        rse = statistics.stdev(rw) / math.sqrt(len(rw)) if len(rw) > 1 else float("nan")
        print(f"{name:34s} {statistics.mean(r['ess_mean'] for r in rows):8.1f} {statistics.mean(r['ess_final'] for r in rows):9.1f} "
              f"{statistics.mean(r['resamples'] for r in rows):7.1f} {sd:7.3f} {statistics.mean(lz):9.3f} "
              f"{statistics.mean(rw):6.3f} ± {rse:5.3f} {statistics.median(r['seconds'] for r in rows):8.1f}")  # fmt: skip
    a, b = "tilted, from_reward, lookahead 8", "tilted, head (dense)"
    if a in results and b in results:
        ratios = [rb["seconds"] / ra["seconds"] for ra, rb in zip(results[a], results[b])]
        print(f"\ntilted proposal time, head (dense) / from_reward (lookahead 8): median {statistics.median(ratios):.2f} "
              f"(per seed {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
