"""``posterior train``: fit a policy to pi* ∝ pi0 exp(r/beta) and save it (a LoRA adapter by default),
or, with ``--twist``, a learned twist for SMC (``pst.twists.learned``; load it with
``posterior sample --method smc --twist PATH``).

    posterior train "The movie was" --reward sentiment --beta 0.1 --objective dpg --steps 60 \\
        --batch-size 8 --max-new-tokens 16 --lora-rank 8 --checkpoint-dir runs/dpg --out runs/dpg/policy
    posterior train "The movie was" --twist --objective ctl --steps 60 --checkpoint-dir runs/ctl

Metrics go to ``CHECKPOINT_DIR/metrics.jsonl`` (one JSON object per step); running the same
command again resumes from the last checkpoint. ``--json`` prints one summary object at the end.
"""

from __future__ import annotations

import os
import sys
import time

from posterior.cli import options, output

SHOWN = ("reward_mean", "kl_prior", "kl_target_forward", "kl_target_reverse", "ess", "log_Z")
LORA_RANK = 8  # --lora-rank's default
TWIST_SHOWN = ("loss", "reward_mean", "ess", "log_Z", "log_Z_batch")  # kl_* are not defined for twists


def add_parser(subparsers):
    from posterior.train.config import default, help_of  # the settings' defaults and help, once (no torch)
    from posterior.train.objective_names import ALIASES, POLICY_OBJECTIVES, TWIST_OBJECTIVES

    p = options.add_subparser(subparsers, "train", help="fit a policy (LoRA adapter) to pi* and save it",
                              description=__doc__.split("\n\n")[0].replace("``", ""))  # fmt: skip
    options.add_posterior_options(p, max_new_tokens=16, fixed_seed_only=True)
    aliases = ", ".join(f"{a} = {c}" for a, c in sorted(ALIASES.items()))
    p.add_argument("--objective", default=None, choices=sorted(POLICY_OBJECTIVES) + sorted(ALIASES) + sorted(TWIST_OBJECTIVES),
                   help=f"training objective ({aliases}); with --twist: {', '.join(sorted(TWIST_OBJECTIVES))} "
                        "(default: dpg, with --twist ctl)")
    p.add_argument("--twist", action="store_true",
                   help="train a learned twist for SMC (pst.twists.learned) instead of a policy")
    for name, kind in (("steps", int), ("batch_size", int), ("lr", float)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default(name), help=help_of(name))
    p.add_argument("--lora-rank", type=int, default=None,
                   help=f"LoRA rank of a policy (default {LORA_RANK}); 0 trains a full copy of the model (not with --twist)")
    p.add_argument("--checkpoint-dir", default=None, help=help_of("checkpoint_dir"))
    p.add_argument("--checkpoint-every", type=int, default=default("checkpoint_every"), help=help_of("checkpoint_every"))
    p.add_argument("--out", default=None, help="folder to save the trained policy or twist (default: CHECKPOINT_DIR/policy or /twist)")
    options.add_output_options(p)
    options.add_model_options(p)
    return p


def check(args) -> str:
    """Every argument, before the model (or torch) loads; returns the folder the policy is saved to.
    The training settings are checked by building their ``FitConfig`` (kept as ``args.fit_config``)."""
    from posterior.train.config import FitConfig
    from posterior.train.objective_names import TWIST_OBJECTIVES
    from posterior.validate import check_output_folder

    options.check_model(args, backends=("hf",), command="posterior train")
    options.check_posterior(args)
    if args.objective is None:
        args.objective = "ctl" if args.twist else "dpg"
    if args.twist:
        if args.objective not in TWIST_OBJECTIVES:
            raise ValueError(f"--objective {args.objective} trains a policy; a twist (--twist) trains with one of {sorted(TWIST_OBJECTIVES)}")
    elif args.objective in TWIST_OBJECTIVES:
        raise ValueError(f"--objective {args.objective} trains a twist: add --twist")
    args.fit_config = FitConfig(
        objective=args.objective, max_new_tokens=args.max_new_tokens, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, prompts=args.prompts or None, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, progress=not args.quiet,
    )  # fmt: skip
    if args.twist and args.lora_rank is not None:
        raise ValueError(f"--lora-rank {args.lora_rank} sets a policy's adapter; --twist trains a twist head, which has none")
    if args.lora_rank is None:
        args.lora_rank = LORA_RANK
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0: full copy), got {args.lora_rank}")
    options.check_memory(args, "--batch-size", args.batch_size)
    what = "twist" if args.twist else "policy"
    out = args.out or (os.path.join(args.checkpoint_dir, what) if args.checkpoint_dir else None)
    if out is None:
        raise ValueError(f"give --out (or --checkpoint-dir) to save the trained {what}")
    for flag, path in (("--checkpoint-dir", args.checkpoint_dir), ("--out", out)):  # written only after training
        if path is not None:
            check_output_folder(flag, path)
    options.check_device(args)
    return out


def run(args) -> int:
    import posterior as pst  # its names load on use: torch loads with the model, after the checks
    from posterior.train.objective_names import policy_objective

    out = check(args)
    canonical = args.objective if args.twist else policy_objective(args.objective)
    progress = not args.quiet
    options.stage(args, f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'}")
    with output.line_progress(progress):
        post = options.load_posterior(args)
        if args.twist:  # the kind the prior's capabilities call for (a head over hidden states for HF)
            policy = pst.twists.learned(post.prior, max_new_tokens=args.max_new_tokens, prompts=args.prompts or None)
        else:
            policy = pst.train.policy_from(post.prior, lora_rank=args.lora_rank or None, seed=args.seed)
        options.stage(args, f"training: objective {args.objective}, {args.steps} steps of batch {args.batch_size}")
        t0 = time.perf_counter()
        run_ = pst.train.fit(post, policy, args.fit_config)
        seconds = time.perf_counter() - t0
    summary = {"trained": "twist" if args.twist else "policy", "objective": canonical, "requested_objective": args.objective, "steps": run_.steps,
               "resumed_from": run_.resumed_from, "seconds": seconds, "saved": None,
               "metrics_path": None if run_.metrics_path is None else str(run_.metrics_path), "final": run_.final}  # fmt: skip
    try:
        summary["saved"] = str(policy.save(out))
    except (OSError, ValueError) as e:  # the run is done: report it, and say why it was not saved
        summary["save_error"] = f"{type(e).__name__}: {e}"
    if args.json:
        output.json_line(summary)
    else:
        name = args.objective if args.objective == canonical else f"{args.objective} ({canonical})"
        print(f"trained {name} for {run_.steps} steps in {seconds:.1f} s"
              + (f" (resumed from step {run_.resumed_from})" if run_.resumed_from else ""))  # fmt: skip
        f = run_.final
        for key in TWIST_SHOWN if args.twist else SHOWN:
            print(f"  {key} (estimate, last batch): {output.num(f.get(key))}")
        if summary["saved"] is not None:
            print(f"  saved: {summary['saved']}")
    if summary["saved"] is None:
        print(f"posterior: error: the {summary['trained']} was not saved to {out!r}: {summary['save_error']}", file=sys.stderr)
        return options.EXIT_BAD_INPUT
    return 0

