"""``posterior batch``: sample pi* for every prompt of a file, one JSON line per prompt, resumable.

    posterior batch prompts.jsonl --out samples.jsonl --reward sentiment --beta 0.1 --method smc \\
        -n 16 --max-new-tokens 32 [--ray --workers 4 [--ray-address HOST:PORT]]

PROMPTS is JSONL (``{"prompt": TEXT}`` or ``{"messages": [...]}`` per line; by the .jsonl /
.ndjson name, or ``--format jsonl``) or plain text, one prompt per line. Killed at any point and
started again with the same command, it skips the prompts already written and ends with the same
file an uninterrupted run writes; a restart with other settings is refused, naming them
(OUT.meta.json records them). Exit codes: 0 done, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

# Settings that decide the output (recorded in OUT.meta.json and checked on resume). --batch-size,
# --workers, --ray, --ray-address and --quiet do not change a line, so a resume may change them.
MODEL_SETTINGS = ("model", "gguf_file", "backend", "engine_option", "reward", "beta", "chat", "device", "temperature",
                  "top_k", "top_p")  # fmt: skip


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**64:
        raise argparse.ArgumentTypeError(f"--seed takes an int in [0, 2**64) (a batch job needs a fixed seed), got {text!r}")
    return seed


def add_parser(subparsers) -> argparse.ArgumentParser:
    from posterior.samplers import SAMPLERS

    p = subparsers.add_parser("batch", help="sample pi* for every prompt of a file (JSONL out, resumable, --ray)",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 2)[2])  # fmt: skip
    p.add_argument("prompts_file", metavar="PROMPTS", help="JSONL ({\"prompt\": ...} or {\"messages\": [...]}) or text, one prompt per line")
    p.add_argument("--out", required=True, help="output JSONL, one line per prompt (resumed if it exists)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "text"], help="PROMPTS format (auto: by file name)")
    p.add_argument("--reward", default="sentiment", help="reward spec, as `posterior sample --reward`")
    p.add_argument("--beta", type=float, default=0.1, help="temperature of the posterior (> 0)")
    p.add_argument("--method", default="is", choices=sorted(SAMPLERS), help="sampler")
    p.add_argument("-n", type=int, default=16, help="samples (particles, chains) per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per continuation, EOS counted")
    p.add_argument("--seed", type=_seed, default=0, help="job seed; prompt i uses a seed derived from (seed, i)")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. block_size=4 (repeatable)")
    p.add_argument("--model", default=None, help="folder of a transformers causal LM (default: SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="transformers (hf) or vLLM")
    p.add_argument("--engine-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="vllm.LLM option with --backend vllm (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the model's chat template")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the CPU)")
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature (changes pi0)")
    p.add_argument("--top-k", type=int, default=None, help="prior top-k (changes pi0)")
    p.add_argument("--top-p", type=float, default=None, help="prior top-p (changes pi0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per Ray task (does not change the output)")
    p.add_argument("--ray", action="store_true", help="data parallel over Ray actors (pip install 'posterior-align[ray]')")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each loading the model once (with --ray)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start Ray locally)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def model_spec(args) -> dict:
    """The settings that build the posterior, as plain data (sent to Ray workers, recorded on disk)."""
    spec = {k: getattr(args, k) for k in MODEL_SETTINGS}
    spec["engine_option"] = dict(spec["engine_option"])
    if spec["model"] is not None and os.path.exists(spec["model"]):  # workers may run in another folder
        spec["model"] = os.path.abspath(spec["model"])
    return spec


def check_model_spec(spec: dict) -> None:
    """Bad combinations, before any model loads."""
    if spec["backend"] == "vllm":
        if spec["device"] is not None or spec["gguf_file"] is not None:
            raise ValueError(f"--backend vllm takes neither --device nor --gguf-file, got {spec['device']!r}, {spec['gguf_file']!r}")
    elif spec["engine_option"]:
        raise ValueError(f"--engine-option {spec['engine_option']} needs --backend vllm")
    if not spec["beta"] > 0 or spec["beta"] != spec["beta"] or spec["beta"] == float("inf"):
        raise ValueError(f"--beta must be a finite number > 0, got {spec['beta']}")


def build_posterior(spec: dict):
    """The Posterior that ``spec`` (from :func:`model_spec`) describes; module-level so that Ray
    workers receive it by reference and each builds its own."""
    import posterior as pst
    from posterior.rewards import from_spec

    sampling = {"temperature": spec["temperature"], "top_k": spec["top_k"], "top_p": spec["top_p"], "chat": spec["chat"]}
    if spec["backend"] == "vllm":
        engine = spec["engine_option"]
        if spec["model"] is None:
            prior = pst.load_default_prior(backend="vllm", **sampling, **engine)
        else:
            prior = pst.VLLMPrior.from_pretrained(spec["model"], **sampling, **engine)
    elif spec["model"] is None:
        prior = pst.load_default_prior(device=spec["device"], **sampling)
    else:
        prior = pst.HFPrior.from_pretrained(spec["model"], gguf_file=spec["gguf_file"], device=spec["device"], **sampling)
    return pst.Posterior(prior, from_spec(spec["reward"], prior=prior), beta=spec["beta"])


def run(args) -> int:
    from posterior.batch.jobs import run as run_job

    spec = model_spec(args)
    try:
        check_model_spec(spec)
        report = run_job(
            functools.partial(build_posterior, spec), args.prompts_file, args.out, n=args.n, method=args.method,
            max_new_tokens=args.max_new_tokens, seed=args.seed, options=dict(args.option), batch_size=args.batch_size,
            ray=args.ray, workers=args.workers, ray_address=args.ray_address, settings=spec, format=args.format,
            progress=not args.quiet,
        )  # fmt: skip
    except (ValueError, TypeError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"posterior: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        resumed = f", {report.skipped} already there" if report.skipped else ""
        print(f"posterior: batch done: {report.written} prompts written to {report.out}{resumed} "
              f"({report.seconds:.1f} s)", file=sys.stderr)  # fmt: skip
    return 0
