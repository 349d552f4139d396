"""``posterior overopt``: proxy and gold reward against KL(·||pi0) over a sweep of beta.

    posterior overopt "The movie was" --proxy sentiment --gold afinn --betas 0.05,0.1,0.2,0.5,1,2 \\
        --methods is,smc,bon -n 256 --max-new-tokens 24 --plot overopt.png [--json]

IS and best-of-k reweight one pool of n prior draws per prompt; SMC runs once per beta. Gao et
al.'s forms are fitted to the gold curve, and the beta / KL where gold peaks is reported
(``pst.overoptimization``; README: "Reward overoptimisation").
"""

from __future__ import annotations

import argparse
import sys

from posterior.cli import options, output


def _betas(text: str) -> list[float]:
    try:
        betas = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers > 0, got {text!r}") from None
    if not betas or any(not (b > 0 and b < float("inf")) for b in betas):
        raise argparse.ArgumentTypeError(f"takes comma-separated finite numbers > 0, got {text!r}")
    return betas


def _policy_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"takes NAME=PATH, got {text!r}")
    return name, path


def add_parser(subparsers):
    p = options.add_subparser(subparsers, "overopt", help="proxy vs gold reward along the KL axis (overoptimisation)",
                              description=__doc__.split("\n\n")[0].replace("``", ""))  # fmt: skip
    p.add_argument("prompts", nargs="*", help="prompts to continue (none: one unconditional prompt)")
    p.add_argument("--proxy", default="sentiment", help="reward spec optimised, e.g. sentiment or ensemble:uwo:0.5:sentiment,textblob")
    p.add_argument("--gold", default="afinn", help="reward spec only measured, e.g. afinn")
    p.add_argument("--betas", type=_betas, default="0.05,0.1,0.2,0.5,1,2", help="comma-separated temperatures")
    p.add_argument("--methods", default="is,smc,bon", help="comma-separated, from is, smc, bon")
    p.add_argument("-n", type=int, default=128, help="prior draws per prompt in the shared pool; SMC particles")
    p.add_argument("--smc-n", type=int, default=None, help="SMC particles per run (default: n)")
    p.add_argument("--smc-option", type=options.key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="an SMC option, e.g. ess_threshold=0.5 (repeatable)")
    p.add_argument("--policy", type=_policy_spec, action="append", default=[], metavar="NAME=PATH",
                   help="a policy saved by `posterior train` (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per continuation, EOS counted")
    p.add_argument("--seed", type=options.fixed_seed, default=0, help="random seed, an int in [0, 2**64)")
    p.add_argument("--plot", default=None, help="write the proxy / gold vs sqrt(KL) PNG here")
    options.add_output_options(p)
    options.add_model_options(p)
    return p


def check(args) -> tuple[list[str], dict, dict]:
    """Every argument, before the model (or torch) loads."""
    from posterior.overopt import METHODS
    from posterior.validate import check_int

    options.check_model(args, command="posterior overopt")
    check_int("n", args.n, 2)
    if args.smc_n is not None:
        check_int("smc_n", args.smc_n, 1)
    check_int("max_new_tokens", args.max_new_tokens, 1)
    options.check_memory(args, "-n", args.n)
    if args.smc_n is not None:
        options.check_memory(args, "--smc-n", args.smc_n)
    for i, prompt in enumerate(args.prompts):
        if not prompt:
            raise ValueError(f"prompt #{i} is the empty string; give no prompt for an unconditional sample")
    for flag, spec in (("--proxy", args.proxy), ("--gold", args.gold)):
        try:
            options.check_reward_spec(spec)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} in --methods {args.methods!r}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods {args.methods!r} names a method twice")
    smc = options.check_method_options("smc", args.smc_option, prefix="--smc-option ") if args.smc_option else {}
    if smc and "smc" not in methods:
        raise ValueError(f"--smc-option given but smc is not in --methods {args.methods!r}")
    policies = options.policy_folders(args.policy)
    options.check_plot_path(args.plot, "overopt.png")
    options.check_device(args)
    return methods, smc, policies


def run(args) -> int:
    import posterior as pst
    from posterior.rewards import from_spec

    methods, smc_options, policy_paths = check(args)
    # rewards that do not read the prior are built first: a bad spec fails before the model loads
    rewards = {}
    for flag, spec in (("--proxy", args.proxy), ("--gold", args.gold)):
        if not options.needs_prior(spec):
            try:
                rewards[flag] = from_spec(spec)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
    options.stage(args, f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'}")
    with output.line_progress(not args.quiet):
        prior = options.load_prior(args)
        for flag, spec in (("--proxy", args.proxy), ("--gold", args.gold)):
            rewards.setdefault(flag, from_spec(spec, prior=prior))
        policies = {name: pst.train.load_policy(prior, path) for name, path in policy_paths.items()}
        options.stage(args, f"sweeping {len(args.betas)} betas with {', '.join(methods + list(policies))}: n={args.n}, "
                            f"max_new_tokens={args.max_new_tokens}")  # fmt: skip
        rep = pst.overoptimization(
            prior, rewards["--proxy"], rewards["--gold"], betas=args.betas, methods=methods, policies=policies, n=args.n,
            max_new_tokens=args.max_new_tokens, prompts=args.prompts or None, seed=args.seed, smc_n=args.smc_n,
            smc_options=smc_options,
        )  # fmt: skip
    plot_error = output.print_report(rep, as_json=args.json, plot_path=args.plot)
    if plot_error is not None:
        print(f"posterior: error: --plot {args.plot!r}: {plot_error}", file=sys.stderr)
        return options.EXIT_BAD_INPUT
    return 0
