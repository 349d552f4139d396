"""``posterior compare``: samplers and trained policies on one posterior, with the reward–KL plot.

    posterior compare "The movie was" --reward sentiment --beta 0.1 --methods is,smc,bon -n 16 \\
        --policy dpg=runs/dpg/policy --plot frontier.png [--json]

``--policy NAME=PATH`` loads a policy saved by ``posterior train`` over the same model.
"""

from __future__ import annotations

import argparse
import json
import sys


def _policy_spec(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--policy takes NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    return name, path


def _method_option(text: str) -> tuple[str, str, object]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"--option takes METHOD.KEY=VALUE (e.g. bon.best_of=4), got {text!r}")
    key, value = text.split("=", 1)
    method, name = key.split(".", 1)
    try:
        return method, name, json.loads(value)
    except json.JSONDecodeError:
        return method, name, value


def add_parser(subparsers) -> argparse.ArgumentParser:
    from posterior.train.cli import add_model_options

    p = subparsers.add_parser("compare", help="compare samplers and trained policies; reward-KL frontier plot",
                              description=__doc__.split("\n\n")[0])  # fmt: skip
    add_model_options(p)
    p.add_argument("--methods", default="is,smc,bon", help="comma-separated samplers")
    p.add_argument("-n", type=int, default=16, help="sequences decoded per prompt by every method / policy")
    p.add_argument("--policy", type=_policy_spec, action="append", default=[], metavar="NAME=PATH",
                   help="a policy saved by `posterior train` (repeatable)")
    p.add_argument("--option", type=_method_option, action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. bon.best_of=4 or smc.ess_threshold=0.5 (repeatable)")
    p.add_argument("--plot", default=None, help="write the reward-KL frontier PNG here")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import posterior as pst
    from posterior.train.cli import load_posterior

    try:
        post = load_posterior(args)
        policies = {name: pst.train.load_policy(post.prior, path) for name, path in args.policy}
        options: dict[str, dict] = {}
        for method, key, value in args.option:
            options.setdefault(method, {})[key] = value
        methods = [m for m in args.methods.split(",") if m]
        rep = pst.compare(post, methods=methods, policies=policies, n=args.n, max_new_tokens=args.max_new_tokens,
                          prompts=args.prompts or None, seed=args.seed, method_options=options)  # fmt: skip
        plot = rep.plot(args.plot) if args.plot else None
    except (ValueError, TypeError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"posterior: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for row in rep.to_json()["rows"]:
            print(json.dumps(row))
        print(json.dumps({"summary": True, **{k: v for k, v in rep.to_json().items() if k != "rows"},
                          "plot": None if plot is None else str(plot)}))  # fmt: skip
    else:
        print(rep.format_table())
        if plot is not None:
            print(f"plot: {plot}")
    return 0
