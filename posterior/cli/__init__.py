"""The command line: ``posterior sample | train | compare | batch | serve | overopt ...`` (``posterior --help``).

One module per subcommand (``posterior/cli/sample.py``, ...), each with ``add_parser(subparsers)``
(returns its parser) and ``run(args) -> exit code``, registered by name in :data:`SUBCOMMANDS`.
Options shared by subcommands (model, posterior, output) and their checks live in
:mod:`posterior.cli.options`: every argument is checked before a model, or torch, loads (the
subcommand modules import torch and the library's heavy modules in ``run``, after the checks), so
bad input fails in a fraction of a second.

Exit codes: 0 done, 2 bad input or a failed run (one line on stderr: ``posterior: error: ...``),
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import importlib
import os
import sys

from posterior.cli import options

SUBCOMMANDS = ("sample", "train", "compare", "batch", "serve", "overopt")  # modules of posterior.cli, in --help order


def build_parser() -> options.ArgumentParser:
    from posterior import __version__

    parser = options.ArgumentParser(
        prog="posterior", formatter_class=options.HelpFormatter,
        description="Inference-time alignment of language models: sample, train towards and compare "
                    "pi*(x) ∝ pi0(x)·exp(r(x)/beta).",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"posterior {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"posterior.cli.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring).

    A ``ValueError`` (and a missing file or module) from a subcommand is bad input: one line on
    stderr, exit 2. Ctrl-C (SIGINT) ends a run with one line on stderr and exit code 130. Run as
    the program (``argv`` None), the process then exits at once: tearing down torch and
    transformers at interpreter exit takes seconds, and nothing is left to write."""
    stderr = sys.stderr
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        sys.stderr = stderr
        print(f"posterior: error: {e}", file=stderr, flush=True)
        return options.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr = stderr
        print("posterior: interrupted", file=stderr, flush=True)
        if argv is None:
            for stream in (sys.stdout, stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(options.EXIT_INTERRUPTED)
        return options.EXIT_INTERRUPTED
    finally:
        sys.stderr = stderr


__all__ = ["SUBCOMMANDS", "build_parser", "main"]
