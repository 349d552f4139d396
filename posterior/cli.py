"""Command line: ``posterior sample PROMPT... --reward sentiment --beta 0.1 --method smc``.

Prints posterior samples next to plain prior samples of the same prompt, with rewards and the
diagnostics (log Z, ESS, KL(pi*||pi0)); ``--json`` prints one JSON object per sample and then one
summary object per run instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def _reward(spec: str, prior=None):
    """The reward named by ``--reward`` (a registry lookup, ``posterior.rewards.from_spec``; bad
    specs raise ValueError, which ``main`` reports). ``judge:QUESTION`` needs ``prior``."""
    from posterior.rewards import from_spec

    return from_spec(spec, prior=prior)


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    from posterior.samplers import SAMPLERS

    parser = argparse.ArgumentParser(prog="posterior", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample pi*(x) ∝ pi0(x)·exp(r(x)/beta) for one or more prompts")
    s.add_argument("prompts", nargs="*", help="prompts to continue (none: one unconditional sample)")
    s.add_argument("--reward", default="sentiment", help="sentiment | negative-sentiment | contains:WORD")
    s.add_argument("--beta", type=float, default=0.1, help="temperature of the posterior (> 0)")
    s.add_argument("--method", default="is", choices=sorted(SAMPLERS), help="sampler")
    s.add_argument("-n", type=int, default=16, help="samples (particles, chains) per prompt")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens per continuation, EOS counted")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--model", default=None, help="folder of a transformers causal LM (default: SmolLM2-135M-Instruct)")
    s.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    s.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="run the prior with transformers (hf) or serve it with vLLM (vllm; README: vLLM backend)")
    s.add_argument("--engine-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="vllm.LLM option with --backend vllm, e.g. tensor_parallel_size=4 (repeatable)")
    s.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    s.add_argument("--temperature", type=float, default=1.0, help="prior temperature (changes pi0)")
    s.add_argument("--top-k", type=int, default=None, help="prior top-k (changes pi0)")
    s.add_argument("--top-p", type=float, default=None, help="prior top-p (changes pi0)")
    s.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. best_of=8, ess_threshold=0.5, reward_upper_bound=1 (repeatable)")
    s.add_argument("--no-prior", action="store_true", help="skip the plain prior samples shown for comparison")
    s.add_argument("--show", type=int, default=5, help="samples to print per prompt (text output)")
    s.add_argument("--json", action="store_true", help="JSON lines: one per sample, then a summary")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import posterior as pst

    progress = not args.quiet and not args.json and sys.stderr.isatty()
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, chat=args.chat, device=args.device)
    t0 = time.perf_counter()
    try:
        if args.backend == "vllm":  # vLLM places the model itself: no --device, no GGUF
            if args.device is not None or args.gguf_file is not None:
                raise ValueError(f"--backend vllm takes neither --device nor --gguf-file, got {args.device!r}, {args.gguf_file!r}")
            del sampling["device"]
            engine = dict(args.engine_option)
            if args.model is None:
                prior = pst.load_default_prior(backend="vllm", **sampling, **engine)
            else:
                prior = pst.VLLMPrior.from_pretrained(args.model, **sampling, **engine)
        elif args.engine_option:
            raise ValueError(f"--engine-option {args.engine_option} needs --backend vllm")
        elif args.model is None:
            prior = pst.load_default_prior(**sampling)
        else:
            prior = pst.HFPrior.from_pretrained(args.model, gguf_file=args.gguf_file, **sampling)
        load_s = time.perf_counter() - t0
        post = pst.Posterior(prior, _reward(args.reward), beta=args.beta)
        prompts = args.prompts or None
        res = post.sample(n=args.n, method=args.method, max_new_tokens=args.max_new_tokens, prompts=prompts,
                          seed=args.seed, progress=progress, **dict(args.option))
        base = None
        if not args.no_prior:  # plain prior draws of the same prompts, for comparison
            base_post = pst.Posterior(prior, post.reward, beta=args.beta)
            base = base_post.sample(n=args.n, method="is", max_new_tokens=args.max_new_tokens, prompts=prompts,
                                    seed=args.seed + 1, progress=progress)
    except (ValueError, TypeError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"posterior: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(res, base)
    else:
        _print_text(res, base, args.show, load_s)
    return 0


def _num(x: float):
    return x if math.isfinite(x) else str(x)


def _print_json(res, base) -> None:
    names = res.prompts or [None]
    for p, prompt in enumerate(names):
        for i, text in enumerate(res.texts[p]):
            print(json.dumps({"prompt": prompt, "text": text, "reward": _num(float(res.rewards[p, i])),
                              "log_weight": _num(float(res.log_weights[p, i]))}))
    s = res.summary()
    summary = {"method": s["method"], "beta": s["beta"], "n": s["n"], "prompts": res.prompts,
               "log_Z": s["log_Z"], "ess": s["ess"], "reward_mean": s["reward_mean"], "kl": s["kl"],
               "seconds": s["seconds"]}
    summary.update({k: v for k, v in s.items() if k not in summary})
    if base is not None:
        summary["prior_reward_mean"] = base.rewards.double().mean(-1).tolist()
    print(json.dumps(summary, default=str))


def _print_text(res, base, show: int, load_s: float) -> None:
    names = res.prompts or ["<unconditional>"]
    for p, prompt in enumerate(names):
        print(f"=== prompt: {prompt!r}")
        w = res.log_weights[p].exp()
        order = torch.argsort(w, descending=True)[:show].tolist()
        print(f"--- posterior samples ({res.method}, beta={res.beta:g}), highest weight first")
        for i in order:
            print(f"  [r={res.rewards[p, i].item():+.3f} w={w[i].item():.3f}] {res.texts[p][i]!r}")
        if base is not None:
            print("--- prior samples")
            for i in range(min(show, len(base.texts[p]))):
                print(f"  [r={base.rewards[p, i].item():+.3f}] {base.texts[p][i]!r}")
            print(f"--- reward mean: posterior {res.reward_mean()[p].item():+.4f}   prior {base.rewards[p].double().mean().item():+.4f}")
    print("--- diagnostics")
    print(res.format_summary())
    print(f"  model load: {load_s:.2f}s")


if __name__ == "__main__":
    sys.exit(main())
