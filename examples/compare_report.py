"""A comparison report on the default model: IS, SMC and best-of-n against trained policies.

    python examples/train_sentiment.py --out runs/sentiment --objectives dpg,rl --steps 40
    python examples/compare_report.py --policy dpg=runs/sentiment/dpg/policy \\
        --policy rl=runs/sentiment/rl/policy --plot runs/frontier.png --json runs/report.json
    python examples/compare_report.py --toy --policy dpg=runs/toy/dpg/policy --plot runs/toy.png

Every row decodes the same number of sequences per prompt (``-n``; best-of-k returns n/k outputs,
each the best of k draws). The frontier is estimated by reweighting prior draws (the default
model's support cannot be enumerated); numbers marked as estimates in the table are estimates.

Not timed separately on the default model (16 sequences per row and a 128-draw frontier: minutes on
a CPU; its table is on docs/benchmarks.md). ``--toy`` (a tiny random model, with the policy that
``train_sentiment.py --toy`` saved): about 34 s at load 6 (2026-12-05, this project's 2 CPU cores
shared with other jobs, one thread), mostly imports (what CI runs).
"""

from __future__ import annotations

import argparse
import json

import torch

import posterior as pst
from posterior.testing import tiny_hf_prior
from posterior.threads import default_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=PATH", help="a saved policy (repeatable)")
    ap.add_argument("--plot", required=True, help="where to write the frontier PNG")
    ap.add_argument("--json", default=None, help="where to write the report as JSON")
    ap.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default 'The movie was')")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("-n", type=int, default=16, help="sequences decoded per prompt by each row")
    ap.add_argument("--best-of", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--frontier-n", type=int, default=128, help="prior draws per prompt for the frontier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per free core)")
    ap.add_argument("--toy", action="store_true", help="a tiny random model at small sizes (what CI runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or default_threads())  # the fast choice on a shared machine
    if args.toy:  # posterior.testing's tiny model, built from a fixed seed: the one train_sentiment.py --toy trains
        args.n, args.best_of, args.max_new_tokens, args.frontier_n = 4, 2, 4, 8

    prior = tiny_hf_prior("llama") if args.toy else pst.load_default_prior()
    post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=args.beta)
    policies = {}
    for spec in args.policy:
        name, path = spec.split("=", 1)
        policies[name] = pst.train.load_policy(prior, path)
    policies["pi0 (untrained)"] = pst.train.policy_from(prior, lora_rank=8)  # q = pi0: the reference point
    rep = pst.compare(
        post, methods=["is", "smc", "bon"], policies=policies, n=args.n, max_new_tokens=args.max_new_tokens,
        prompts=args.prompt or ["The movie was"], seed=args.seed, method_options={"bon": {"best_of": args.best_of}},
        frontier_n=args.frontier_n,
    )  # fmt: skip
    print(rep.format_table())
    print(f"plot: {rep.plot(args.plot)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.to_json(), f, indent=1)
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
