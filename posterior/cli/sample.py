"""``posterior sample PROMPT... --reward sentiment --beta 0.1 --method smc``.

Prints posterior samples next to plain prior samples of the same prompt, with rewards and the
diagnostics (log Z, ESS, KL(pi*||pi0)); ``--json`` prints one JSON object per sample and then one
summary object per run instead (strict JSON: a non-finite number is null, its reason under
"nonfinite"). Progress goes to stderr, one line per stage (and per 10% of a long stage when
stderr is not a terminal). Exit codes: 0 done, 2 bad input or a failed sampler, 130 interrupted.
"""

from __future__ import annotations

import os
import textwrap
import time

from posterior.cli import options, output

DESCRIPTION = (
    "Sample the posterior pi*(x) ∝ pi0(x)·exp(r(x)/beta) of a language model pi0 and a reward r, "
    "and show the samples next to plain prior samples with their diagnostics."
)


def add_parser(subparsers):
    from posterior.samplers.options import OPTIONS

    epilog = (
        "rewards (--reward):\n" + _reward_names() + "\n\n"
        "method options (--option KEY=VALUE, repeatable; each shown with its default and help):\n" + _methods_help() + "\n\n"
        "examples:\n"
        '  posterior sample "The movie was" --reward sentiment --beta 0.1 --method smc -n 32 --max-new-tokens 32\n'
        '  posterior sample "The movie was" --method bon --option best_of=8 --json\n'
        '  posterior sample "Hello" --reward contains:great --method rejection --option reward_upper_bound=0\n\n'
        "exit codes: 0 done, 2 bad input or a failed sampler (the message names the method), 130 interrupted"
    )
    s = options.add_subparser(subparsers, "sample", help="sample pi*(x) ∝ pi0(x)·exp(r(x)/beta) for one or more prompts",
                              description=textwrap.fill(DESCRIPTION, 96), epilog=epilog)
    options.add_posterior_options(s, max_new_tokens=32)
    s.add_argument("--method", default="is", choices=sorted(OPTIONS), help="sampler, see 'method options' below")
    s.add_argument("-n", type=int, default=16, help="samples (particles, chains) per prompt")
    s.add_argument("--option", type=options.key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. best_of=8 (repeatable); every method's options with their defaults and help "
                        "are listed under 'method options' below")
    s.add_argument("--twist", default=None, metavar="PATH",
                   help="a learned twist saved by `posterior train --twist` (method smc): pst.twists.load(PATH, prior)")
    s.add_argument("--no-prior", action="store_true", help="skip the plain prior samples shown for comparison")
    s.add_argument("--show", type=int, default=5, help="samples to print per prompt (text output)")
    options.add_output_options(s)
    options.add_model_options(s)
    return s


def check(args) -> dict:
    """Every argument, before the model (or torch) loads; returns the method options."""
    from posterior.validate import check_int

    options.check_model(args, command="posterior sample")
    options.check_posterior(args)
    check_int("n", args.n, 1)
    check_int("show", args.show, 0)
    method_options = options.check_method_options(args.method, args.option)
    if args.twist is not None:
        from posterior.twists import CONFIG_FILE

        if args.method != "smc":
            raise ValueError(f"--twist applies to --method smc, got --method {args.method}")
        if "twist" in method_options:
            raise ValueError("give the twist once: --twist PATH or --option twist=..., not both")
        if not os.path.isfile(os.path.join(args.twist, CONFIG_FILE)):
            raise ValueError(f"--twist {args.twist!r} holds no saved twist (no {CONFIG_FILE}); save one with `posterior train --twist`")
    options.check_device(args)
    return method_options


def run(args) -> int:
    """Sample, then the prior comparison (best effort), then print; see the module docstring."""
    method_options = check(args)
    import torch

    from posterior.samplers.common import draw
    from posterior.seeds import derive_seed

    progress = not args.quiet
    t0 = time.perf_counter()
    options.stage(args, f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'}")
    with output.line_progress(progress):
        post = options.load_posterior(args)
        if args.twist is not None:  # after the model: the twist is checked against this prior
            import posterior as pst

            method_options["twist"] = pst.twists.load(args.twist, post.prior)
    load_s = time.perf_counter() - t0
    prompts = args.prompts or None
    n_prompts = len(prompts) if prompts else 1
    options.stage(args, f"loaded in {load_s:.1f} s; sampling: method {args.method}, n={args.n}, "
                        f"max_new_tokens={args.max_new_tokens}, {n_prompts} prompt(s)")
    with output.line_progress(progress):
        try:
            res = post.sample(n=args.n, method=args.method, max_new_tokens=args.max_new_tokens, prompts=prompts,
                              seed=args.seed, progress=progress, **method_options)
        except (ValueError, TypeError) as e:
            msg = str(e)
            raise ValueError(msg if f"method {args.method!r}" in msg else f"method {args.method!r}: {msg}") from e
        options.stage(args, f"sampled in {res.seconds:.1f} s")
        # From here on the result exists: nothing may lose it. The prior comparison is best effort.
        base = base_error = None
        if not args.no_prior:
            options.stage(args, f"prior comparison: {args.n} plain prior draws per prompt")
            try:
                g = torch.Generator(device=post.prior.device)
                g.manual_seed(derive_seed(res.seed if res.seed is not None else 0, "prior comparison"))
                base = draw(post, prompts, args.n, args.max_new_tokens, generator=g, progress=progress)
            except Exception as e:  # noqa: BLE001 -- anything: the posterior result is printed regardless
                base_error = f"{type(e).__name__}: {e}"
    options.stage(args, "done")
    if args.json:
        _print_json(res, base, base_error)
    else:
        _print_text(res, base, base_error, args.show, load_s)
    return 0


# --------------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------------
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
    return options.method_options_help()


METHODS = options.METHODS


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def _prior_mean(base, p: int) -> tuple[float | None, int]:
    """Mean reward of the finite prior draws of prompt p, and how many had reward -inf."""
    import torch

    r = base.rewards[p].double()
    finite = torch.isfinite(r)
    return (float(r[finite].mean()) if bool(finite.any()) else None), int((~finite).sum())


def _print_json(res, base, base_error) -> None:
    names = res.prompts or [None]
    for p, prompt in enumerate(names):
        for i, text in enumerate(res.texts[p]):
            output.json_line({"prompt": prompt, "text": text, "reward": float(res.rewards[p, i]),
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
    output.json_line(summary)


def _showing(shown: int, total: int) -> None:
    if shown < total:
        print(f"  (showing {shown} of {total}; --show N for more, --json for all)")


def _print_text(res, base, base_error, show: int, load_s: float) -> None:
    import torch

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
            print(f"--- {res.method} outputs (beta={res.beta:g}, each the pick of {getattr(res.info, 'best_of', None) or '?'} "
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
        _showing(len(order), N)
        if base is not None:
            print("--- prior samples (plain draws from the model, for comparison)")
            shown = min(show, len(base.cont.texts[p]))
            for i in range(shown):
                print(f"  [r={base.rewards[p, i].item():+.3f}] {base.cont.texts[p][i]!r}")
            _showing(shown, len(base.cont.texts[p]))
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
