"""``posterior compare``: samplers and trained policies on one posterior, with the reward–KL plot.

    posterior compare "The movie was" --reward sentiment --beta 0.1 --methods is,smc,bon -n 16 \\
        --policy dpg=runs/dpg/policy --plot frontier.png [--json]

``--policy NAME=PATH`` loads a policy saved by ``posterior train`` over the same model.
"""

from __future__ import annotations

import argparse
import sys

from posterior.cli import options, output


def _policy_spec(text: str) -> tuple[str, str]:
    if "=" not in text or not text.split("=", 1)[0] or not text.split("=", 1)[1]:
        raise argparse.ArgumentTypeError(f"takes NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    return name, path


def _method_option(text: str) -> tuple[str, str, object]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"takes METHOD.KEY=VALUE (e.g. bon.best_of=4), got {text!r}")
    key, value = options.key_value(text)
    method, name = key.split(".", 1)
    return method, name, value


def add_parser(subparsers):
    p = options.add_subparser(subparsers, "compare", help="compare samplers and trained policies; reward-KL frontier plot",
                              description=__doc__.split("\n\n")[0].replace("``", ""))  # fmt: skip
    options.add_posterior_options(p, max_new_tokens=16, fixed_seed_only=True)
    p.add_argument("--methods", default="is,smc,bon", help="comma-separated samplers")
    p.add_argument("-n", type=int, default=16, help="sequences decoded per prompt by every method / policy")
    p.add_argument("--policy", type=_policy_spec, action="append", default=[], metavar="NAME=PATH",
                   help="a policy saved by `posterior train` (repeatable)")
    p.add_argument("--option", type=_method_option, action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. bon.best_of=4 or smc.ess_threshold=0.5 (repeatable)")
    p.add_argument("--plot", default=None, help="write the reward-KL frontier PNG here")
    p.add_argument("--bounds", action="store_true",
                   help="two-sided brackets beside every row (exact samples by rejection; see pst.bounds)")
    p.add_argument("--bounds-repeats", type=int, default=8, help="independent runs of each side of a bracket (>= 8 for reliable ends)")
    p.add_argument("--bounds-max-draws", type=int, default=None, metavar="N",
                   help="prior draws per prompt the brackets' exact samples (rejection) may take (default 1000 x repeats)")
    options.add_output_options(p)
    options.add_model_options(p)
    return p


def check(args) -> tuple[list[str], dict, dict]:
    """Every argument, before the model (or torch) loads: the methods, their options, the policies."""
    from posterior.samplers.options import METHOD_OPTIONS  # the built-in methods
    from posterior.validate import check_int

    options.check_model(args, command="posterior compare")
    options.check_posterior(args)
    check_int("n", args.n, 2)
    check_int("--bounds-repeats", args.bounds_repeats, 2)
    if args.bounds_max_draws is not None:
        check_int("--bounds-max-draws", args.bounds_max_draws, 1)
        if not args.bounds:
            raise ValueError(f"--bounds-max-draws {args.bounds_max_draws} limits the brackets' exact samples: it needs --bounds")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods and not args.policy:
        raise ValueError(f"--methods {args.methods!r} names no method (and no --policy is given): "
                         f"give e.g. --methods is,smc,bon; methods: {', '.join(sorted(METHOD_OPTIONS))}")  # fmt: skip
    for m in methods:
        if m not in METHOD_OPTIONS:
            raise ValueError(f"unknown method {m!r} in --methods {args.methods!r}; choose from {sorted(METHOD_OPTIONS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods {args.methods!r} names a method twice")
    per_method: dict[str, list] = {}
    for method, key, value in args.option:
        if method not in methods:
            raise ValueError(f"--option {method}.{key}: method {method!r} is not in --methods {args.methods!r}")
        per_method.setdefault(method, []).append((key, value))
    method_options = {m: options.check_method_options(m, pairs, prefix=f"--option {m}.") for m, pairs in per_method.items()}
    for m in methods:  # as pst.compare checks: a best-of-k row decodes n // k outputs of k draws each
        k = method_options.get(m, {}).get("best_of", METHOD_OPTIONS[m]["best_of"].default) if "best_of" in METHOD_OPTIONS[m] else 0
        if k > args.n:
            raise ValueError(f"method {m!r}: best_of={k} exceeds -n {args.n}; compare decodes n sequences per prompt "
                             f"with every method, so give --option {m}.best_of=K with K <= n, or a larger -n")  # fmt: skip
    policies = options.policy_folders(args.policy, methods)
    options.check_plot_path(args.plot, "frontier.png")
    options.check_device(args)
    return methods, method_options, policies


def run(args) -> int:
    import posterior as pst

    methods, method_options, policy_paths = check(args)
    progress = not args.quiet
    options.stage(args, f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'}")
    with output.line_progress(progress):
        post = options.load_posterior(args)
        policies = {name: pst.train.load_policy(post.prior, path) for name, path in policy_paths.items()}
        options.stage(args, f"comparing {', '.join(methods + list(policies))}: n={args.n}, "
                            f"max_new_tokens={args.max_new_tokens}")  # fmt: skip
        try:
            rep = pst.compare(post, methods=methods, policies=policies, n=args.n, max_new_tokens=args.max_new_tokens,
                              prompts=args.prompts or None, seed=args.seed, method_options=method_options,
                              bounds=args.bounds, bounds_repeats=args.bounds_repeats,
                              bounds_max_draws=args.bounds_max_draws, progress=progress)  # fmt: skip
        except TypeError as e:  # a sampler's option of the wrong kind
            raise ValueError(str(e)) from e
    # The comparison exists: print it before the plot, which may still fail.
    plot_error = output.print_report(rep, as_json=args.json, plot_path=args.plot)
    if plot_error is not None:
        print(f"posterior: error: --plot {args.plot!r}: {plot_error}", file=sys.stderr)
        return options.EXIT_BAD_INPUT
    return 0
