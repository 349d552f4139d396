"""Fit LoRA policies to the sentiment posterior of the default model, one per objective.

    pi*(x) ∝ pi0(x) · exp(Sentiment(x) / beta),   pi0 = SmolLM2-135M-Instruct

CPU (minutes; what the README's numbers come from):

    python examples/train_sentiment.py --out runs/sentiment --objectives dpg,rl --steps 40
    python examples/train_sentiment.py --toy --out runs/toy --objectives dpg      # a tiny random model: seconds

GPU (a longer run, batch 32, 32 tokens, 500 steps; many GPUs: ``accelerate launch`` runs the same
loop data-parallel, each process drawing its own batch):

    python examples/train_sentiment.py --out runs/sentiment --gpu
    accelerate launch --num_processes 4 examples/train_sentiment.py --out runs/sentiment --gpu

Each objective writes ``OUT/NAME/`` (checkpoints + metrics.jsonl; rerun the command to resume) and
saves its adapter to ``OUT/NAME/policy`` for ``examples/compare_report.py`` / ``posterior compare``.

Takes about 5 min here for ``--objectives dpg,rl --steps 40``: training took 167 s (dpg) and 140 s
(rl), recorded 2026-12-01 on this project's 2 CPU cores shared with other jobs, one thread
(docs/benchmarks.md). ``--toy`` (a tiny random model, 2 steps of batch 2): about 33 s at load 6 on
2026-12-05, mostly imports (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import posterior as pst
from posterior.testing import tiny_hf_prior
from posterior.threads import default_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for checkpoints, metrics and adapters")
    ap.add_argument("--objectives", default="dpg,rl", help="comma-separated: dpg, rl, js, tv, distill, reward")
    ap.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default 'The movie was')")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per free core)")
    ap.add_argument("--gpu", action="store_true", help="the longer setting on CUDA: 500 steps, batch 32, 32 tokens")
    ap.add_argument("--toy", action="store_true", help="a tiny random model at small sizes (what CI runs)")
    args = ap.parse_args()
    if args.gpu:
        args.steps, args.batch_size, args.max_new_tokens, args.lr = 500, 32, 32, 5e-4
    if args.toy:
        args.steps, args.batch_size, args.max_new_tokens = 2, 2, 4
    torch.set_num_threads(args.threads or default_threads())  # the fast choice on a shared machine
    prompts = args.prompt or ["The movie was"]

    # one GPU per process under `accelerate launch` (LOCAL_RANK), the prior next to the policy
    if args.toy:
        prior = tiny_hf_prior("llama")
    else:
        prior = pst.load_default_prior(device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if args.gpu else None)
    post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=args.beta)
    summary = {}
    for name in [o for o in args.objectives.split(",") if o]:
        policy = pst.train.policy_from(prior, lora_rank=args.lora_rank, seed=args.seed)
        t0 = time.perf_counter()
        run = pst.train.fit(
            post, policy, objective=name, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            max_new_tokens=args.max_new_tokens, prompts=prompts, seed=args.seed,
            checkpoint_dir=f"{args.out}/{name}", checkpoint_every=10, progress=True,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        saved = policy.save(f"{args.out}/{name}/policy")
        first, last = run.metrics[0], run.final
        tail = run.metrics[-10:]
        summary[name] = {
            "seconds": seconds, "resumed_from": run.resumed_from, "steps": run.steps, "saved": str(saved),
            "reward_first_batch": first["reward_mean"], "reward_last10": sum(m["reward_mean"] for m in tail) / len(tail),
            "kl_prior_last10": sum(m["kl_prior"] or 0.0 for m in tail) / len(tail), "log_Z": last["log_Z"],
        }  # fmt: skip
        print(f"{name}: {run.steps} steps in {seconds:.0f}s; batch reward (estimate) first {first['reward_mean']:+.3f}, "
              f"mean of the last 10 {summary[name]['reward_last10']:+.3f}; KL(q||pi0) (estimate, last 10) "
              f"{summary[name]['kl_prior_last10']:.3f}; saved {saved}")  # fmt: skip
    with open(f"{args.out}/train_summary.json", "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
