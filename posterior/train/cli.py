"""``posterior train``: fit a policy to pi* ∝ pi0 exp(r/beta) and save it (a LoRA adapter by default).

    posterior train "The movie was" --reward sentiment --beta 0.1 --objective dpg --steps 60 \\
        --batch-size 8 --max-new-tokens 16 --lora-rank 8 --checkpoint-dir runs/dpg --out runs/dpg/policy

Metrics go to ``CHECKPOINT_DIR/metrics.jsonl`` (one JSON object per step); running the same
command again resumes from the last checkpoint. ``--json`` prints one summary object at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train and compare: the prior and the posterior."""
    p.add_argument("prompts", nargs="*", help="prompts (none: one unconditional prompt)")
    p.add_argument("--reward", default="sentiment", help="sentiment | negative-sentiment | contains:WORD")
    p.add_argument("--beta", type=float, default=0.1, help="temperature of the posterior (> 0)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per continuation, EOS counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="folder of a transformers causal LM (default: SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def load_posterior(args):
    import posterior as pst
    from posterior.cli import _reward

    kw = dict(chat=args.chat, device=args.device)
    prior = pst.load_default_prior(**kw) if args.model is None else pst.HFPrior.from_pretrained(args.model, gguf_file=args.gguf_file, **kw)
    return pst.Posterior(prior, _reward(args.reward), beta=args.beta)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from posterior.train.objectives import ALIASES, OBJECTIVES

    p = subparsers.add_parser("train", help="fit a policy (LoRA adapter) to pi* and save it",
                              description=__doc__.split("\n\n")[0])  # fmt: skip
    add_model_options(p)
    p.add_argument("--objective", default="dpg", choices=sorted(OBJECTIVES) + sorted(ALIASES))
    p.add_argument("--steps", type=int, default=60, help="optimiser steps (a resumed run counts steps done)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per prompt and step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; 0 trains a full copy of the model")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoints + metrics.jsonl; resumes a run found there")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--out", default=None, help="folder to save the trained policy (default: CHECKPOINT_DIR/policy)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import posterior as pst

    progress = not args.quiet and not args.json and sys.stderr.isatty()
    out = args.out or (f"{args.checkpoint_dir}/policy" if args.checkpoint_dir else None)
    if out is None:
        print("posterior: error: give --out (or --checkpoint-dir) to save the trained policy", file=sys.stderr)
        return 2
    try:
        post = load_posterior(args)
        if args.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0 (0: full copy), got {args.lora_rank}")
        policy = pst.train.policy_from(post.prior, lora_rank=args.lora_rank or None, seed=args.seed)
        t0 = time.perf_counter()
        run_ = pst.train.fit(
            post, policy, objective=args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            max_new_tokens=args.max_new_tokens, prompts=args.prompts or None, seed=args.seed,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, progress=progress,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        saved = policy.save(out)
    except (ValueError, TypeError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"posterior: error: {e}", file=sys.stderr)
        return 2
    summary = {"objective": run_.objective, "steps": run_.steps, "resumed_from": run_.resumed_from,
               "seconds": seconds, "saved": str(saved), "metrics_path": None if run_.metrics_path is None else str(run_.metrics_path),
               "final": run_.final}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        f = run_.final
        print(f"trained {run_.objective} for {run_.steps} steps in {seconds:.1f}s"
              + (f" (resumed from step {run_.resumed_from})" if run_.resumed_from else ""))  # fmt: skip
        for key in ("reward_mean", "kl_prior", "kl_target_forward", "kl_target_reverse", "ess", "log_Z"):
            print(f"  {key} (estimate, last batch): {f.get(key)}")
        print(f"  saved: {saved}")
    return 0
