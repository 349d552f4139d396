"""``posterior batch``: sample pi* for every prompt of a file, one JSON line per prompt, resumable.

    posterior batch prompts.jsonl --out samples.jsonl --reward sentiment --beta 0.1 --method smc \\
        -n 16 --max-new-tokens 32 [--ray --workers 4 [--ray-address HOST:PORT]]

PROMPTS is JSONL ({"prompt": TEXT} or {"messages": [...]} per line; by the .jsonl / .ndjson name,
or --format jsonl) or plain text, one prompt per line. Killed at any point and started again with
the same command, it skips the prompts already written and ends with the same file an
uninterrupted run writes; a restart with other settings or another posterior (new weights in
the --model folder, another reward) is refused, naming them (OUT.meta.json records them). An
"id" in a JSONL line is kept in its output line. --out /dev/stdout (or any device or pipe) streams
the lines, without resume. The library function is ``pst.batch.run`` (posterior/batch/jobs.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from posterior.batch.jobs import IDENTITY_FIELDS
from posterior.cli import options

# Settings that build the posterior. They are recorded in OUT.meta.json and checked on resume;
# --batch-size, --workers, --ray, --ray-address and --quiet do not change a line, so a resume may
# change them.
MODEL_SETTINGS = ("model", "gguf_file", "backend", "engine_option", "reward", "beta", "chat", "device", "temperature",
                  "top_k", "top_p")  # fmt: skip


def add_parser(subparsers):
    from posterior.samplers.options import METHOD_OPTIONS

    p = options.add_subparser(subparsers, "batch", help="sample pi* for every prompt of a file (JSONL out, resumable, --ray)",
                              description=__doc__.split("\n\n", 1)[1].replace("``", ""))  # fmt: skip
    p.add_argument("prompts_file", metavar="PROMPTS", help='JSONL ({"prompt": ...} or {"messages": [...]}) or text, one prompt per line')
    p.add_argument("--out", required=True, help="output JSONL, one line per prompt (resumed when it exists)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "text"], help="PROMPTS format (auto: by the file name)")
    p.add_argument("--reward", default="sentiment", help="reward spec, e.g. sentiment, contains:WORD (see `posterior sample --help`)")
    p.add_argument("--beta", type=float, default=0.1, help="temperature of the posterior (> 0): small trusts the reward more")
    p.add_argument("--method", default="is", choices=sorted(METHOD_OPTIONS), help="sampler (see `posterior sample --help`)")
    p.add_argument("-n", type=int, default=16, help="samples (particles, chains) per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per continuation, EOS counted")
    p.add_argument("--seed", type=options.fixed_seed, default=0, help="job seed; prompt i uses a seed derived from (seed, i)")
    p.add_argument("--option", type=options.key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. block_size=4 (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per Ray task (does not change the output)")
    p.add_argument("--ray", action="store_true", help="data parallel over Ray actors (pip install 'posterior-align[ray]')")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each loading the model once (with --ray)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start Ray locally with --workers CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.add_argument("--allow-change", action="append", default=[], choices=IDENTITY_FIELDS, metavar="FIELD",
                   help="resume although this field of the posterior's recorded identity changed, e.g. reward.fingerprint "
                        "for a random reward (repeatable; a refused resume names the fields)")  # fmt: skip
    options.add_model_options(p)
    return p


def model_spec(args) -> argparse.Namespace:
    """The options that build the posterior, as plain data: what ``options.load_posterior`` reads,
    sent to each Ray worker (which loads its own model) and recorded in OUT.meta.json."""
    spec = {k: getattr(args, k) for k in MODEL_SETTINGS}
    spec["engine_option"] = sorted(spec["engine_option"])
    if spec["model"] is not None:  # workers may run in another folder
        spec["model"] = os.path.abspath(spec["model"])
    return argparse.Namespace(**spec)


def run(args) -> int:
    """Check the arguments, then ``pst.batch.run``, which checks the rest (counts, seed, the prompts
    file, a resumed OUT) before it builds the posterior: torch loads with the model."""
    from posterior.batch.jobs import WriteError
    from posterior.batch.jobs import run as run_job
    from posterior.fingerprints import files_fingerprint
    from posterior.validate import check_real

    options.check_model(args, command="posterior batch")
    check_real("beta", args.beta, positive=True)
    options.check_reward_spec(args.reward)
    method_options = options.check_method_options(args.method, args.option)
    options.check_device(args)
    spec = model_spec(args)
    settings = {**vars(spec), "engine_option": [list(kv) for kv in spec.engine_option]}
    if spec.model is not None:  # the path alone would resume over new weights saved into the same folder
        settings["model_files"] = files_fingerprint(spec.model)
    try:
        report = run_job(
            functools.partial(options.load_posterior, argparse.Namespace(**vars(spec), quiet=args.quiet)), args.prompts_file, args.out, n=args.n, method=args.method,
            max_new_tokens=args.max_new_tokens, seed=args.seed, options=method_options, batch_size=args.batch_size,
            ray=args.ray, workers=args.workers, ray_address=args.ray_address, settings=settings, format=args.format,
            progress=not args.quiet, allow_changes=args.allow_change,
        )  # fmt: skip
    except WriteError as e:  # a full disk: one line, and the same command resumes
        print(f"posterior: error: {e}", file=sys.stderr, flush=True)
        return options.EXIT_BAD_INPUT
    if not args.quiet:
        resumed = f", {report.skipped} already there" if report.skipped else ""
        print(f"posterior: batch done: {report.written} prompts written to {report.out}{resumed} "
              f"({report.seconds:.1f} s)", file=sys.stderr)  # fmt: skip
    return 0
