"""SMC against plain ``model.generate`` on the default model: wall time, peak memory, tokens/s.

Both make exactly N×T tokens for the same prompt: generate with ``do_sample=True,
min_new_tokens=T`` (no early stop), SMC with an EOS id the model never emits, so every particle
runs T steps (with the default Sentiment reward at beta = 0.1 the twist resamples often). Times are
best-of-``--repeats``, alternating the two in one process. Peak memory is measured in a fresh
subprocess per method: the peak resident set size (VmHWM, reset after loading the model and a
warm-up through /proc/self/clear_refs; ru_maxrss where that is unavailable) minus the RSS before
the run, or ``torch.cuda.max_memory_allocated`` on a GPU.

    python bench/bench_smc.py [--configs 32x32,64x64] [--repeats 3] [--proposal bootstrap]
                              [--device cpu] [--profile] [--llamppl] [--model default]

``--model llama1b`` replaces the default model by a Llama built from its config with random weights
(TinyLlama-1.1B's shape, bf16 on CUDA, float32 on the CPU), nothing downloaded: its 32000 tokens are
the characters of ``posterior.testing.char_tokenizer`` (the prompt's encoding), VADER's lexicon words
(so the Sentiment reward varies as texts grow and SMC resamples) and filler words. ``llama-tiny`` is
the same construction at toy size, to check the script on a CPU (``bench/gpu_check.sh``).

``--llamppl`` adds the same SMC written with LLaMPPL (Lew et al. 2023) if it is installed (it is
not a dependency of this project: ``python -m venv --system-site-packages VENV && VENV/bin/pip
install llamppl``, which keeps the installed torch). Before its times are reported, both samplers
run the same seeded configurations and must reach the same weighted reward mean within three
standard errors (taken from the spread between runs); otherwise the runner is wrong, not slow.

Measured on a shared 2-core AMD EPYC (CPU, float32, bootstrap, Sentiment twist, beta = 0.1):

    threads  N x T   generate      smc           time ratio  memory ratio (growth / whole process)
    1        32x32   8.20 s 125/s   7.79 s 132/s  0.95        0.86 / 0.99
    1        64x64  27.07 s 151/s  22.99 s 178/s  0.85        0.98 / 1.00
    2        32x32   5.44 s 188/s   4.79 s 214/s  0.88        0.83 / 0.99
    2        64x64  20.73 s 198/s  17.47 s 234/s  0.84        0.91 / 0.98

LLaMPPL ``smc_standard`` (HF backend), 32x32, 1 thread, written as LLaMPPL intends (see
:func:`llamppl_runner`), on the same 2-core machine shared with other jobs (load average 1-7):
weighted reward means over 4 seeded runs, ours 0.803 ± 0.034, LLaMPPL 0.844 ± 0.015 (1.1 standard
errors apart); best of 4: generate 5.6-8.9 s, ours 0.87-0.88x generate, LLaMPPL 66-71 s =
8.0-11.7x generate (back-to-back pairs LLaMPPL/ours: median 13.7x). An independent measurement on
a quiet machine gave ours 0.81x and LLaMPPL 6.9x generate. (An earlier runner twisted LLaMPPL's
particles by increments, which LLaMPPL undoes before each step: its final weights carried no
reward, and its figures, 8.5x and 18.7x, compared unlike samplers.)

The model's forward is ~88% of SMC's time; token draws ~7%, VADER ~2%, cache reorders <1%.
generate spends ~1.4 ms per row per step in ``torch.multinomial`` over the 49k vocabulary, which
SMC's CDF inversion does not, hence ratios below 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

import posterior as pst

PROMPT = "The movie was"


# Config-built Llamas (random weights): TinyLlama-1.1B's shape (1.10e9 parameters) and a toy one.
LLAMA_SHAPES = {
    "llama1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
LLAMA_VOCAB = 32000


def word_tokenizer(size: int):
    """``size`` tokens that need no download: ``char_tokenizer``'s characters (prompts encode to
    these), then VADER's lexicon words and fillers, each decoding to the word and a space."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from posterior.testing import CHARS, char_tokenizer

    words = [f"{w} " for w in sorted(SentimentIntensityAnalyzer().lexicon)]
    fillers = [f"w{i} " for i in range(size)]
    tok = char_tokenizer((CHARS + words + fillers)[: size - 3])  # + <unk>, <bos>, <eos>
    assert len(tok) == size, len(tok)
    return tok


def llama_prior(shape: str, device: str, never: int):
    """A randomly initialised Llama of ``LLAMA_SHAPES[shape]`` that cannot emit token ``never``.

    Residual dimension 0 is held at 0.1 (the embedding writes it, no layer's output projection
    writes to it), so after the final RMSNorm it is positive at every position; the LM head's row
    for ``never`` reads only that dimension, with weight -1e4: its logit is far below all others."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = word_tokenizer(LLAMA_VOCAB)
    cfg = LlamaConfig(vocab_size=LLAMA_VOCAB, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **LLAMA_SHAPES[shape])
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)  # the same throwaway weights in every process (memory runs use subprocesses)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.1
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        head = model.get_output_embeddings().weight
        head[never] = 0.0
        head[never, 0] = -1e4
    return pst.HFPrior(model, tok)


def load(args):
    if args.model == "default":
        prior = pst.load_default_prior(device=args.device)
        never = prior.vocab_size - 1  # an id the model does not emit within T steps: no particle ends early
    else:
        never = LLAMA_VOCAB - 1
        prior = llama_prior(args.model, args.device, never)
    smc_prior = pst.HFPrior(prior.model, prior.tokenizer, eos_token_ids=[never])
    return prior, smc_prior


def runners(prior, smc_prior, N: int, T: int, args):
    model, tok = prior.model, prior.tokenizer
    enc = tok([args.prompt], return_tensors="pt").to(model.device)
    post = pst.Posterior(smc_prior, pst.rewards.Sentiment(), beta=args.beta)
    g = torch.Generator(device=model.device).manual_seed(0)

    def run_generate():
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, num_return_sequences=N, max_new_tokens=T, min_new_tokens=T,
                                 top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.eos_token_id)
        assert out.shape[1] - enc.input_ids.shape[1] == T

    def run_smc(seed: int | None = None):
        if seed is not None:
            g.manual_seed(seed)
        res = post.sample(n=N, method="smc", max_new_tokens=T, prompts=[args.prompt], generator=g,
                          proposal=args.proposal, lookahead=args.lookahead)
        assert int(res.lengths.min()) == T
        return res

    return {"generate": run_generate, "smc": run_smc}


# --- memory, in a fresh process per method ------------------------------------------------------
def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the warm-up's freed blocks neither hide nor
    inflate the measured run's growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(args):
    torch.set_num_threads(args.threads)
    prior, smc_prior = load(args)
    run = runners(prior, smc_prior, args.n, args.tokens, args)[args.child]
    run()  # warm-up: lazy allocations and one-off buffers are not the method's footprint
    gc.collect()
    _trim_heap()
    cuda = prior.model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        exact = _reset_peak()
        before = _status_kib("VmRSS") * 1024
        if not exact:
            before = max(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    run()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"delta_bytes": max(0, peak - before), "peak_bytes": peak, "before_bytes": before}))


def peak_memory(method: str, N: int, T: int, args) -> dict:
    """Median over ``args.memory_runs`` fresh processes of the peak growth during one run."""
    runs = sorted((_peak_memory_once(method, N, T, args) for _ in range(args.memory_runs)), key=lambda r: r["delta_bytes"])
    return runs[len(runs) // 2]


def _peak_memory_once(method: str, N: int, T: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--n", str(N), "--tokens", str(T),
           "--device", args.device, "--proposal", args.proposal, "--lookahead", str(args.lookahead), "--beta", str(args.beta),
           "--threads", str(args.threads), "--prompt", args.prompt, "--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- time ----------------------------------------------------------------------------------------
def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def weighted_reward(log_weights, rewards) -> dict:
    """Weighted reward mean of one SMC run, its ESS and a standard error sqrt(var_w(r) / ESS)."""
    lw = torch.as_tensor(log_weights, dtype=torch.float64).reshape(-1)
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    w = torch.softmax(lw, 0)
    r = torch.where(w > 0, r, 0.0)
    mean = float((w * r).sum())
    ess = float(1.0 / (w * w).sum())
    se = float(((w * (r - mean) ** 2).sum() / ess).sqrt())
    return {"mean": mean, "ess": ess, "se": se}


def llamppl_runner(prior, N: int, T: int, args):
    """The same bootstrap SMC (VADER twist on the partial text, beta, N particles, T tokens) written
    with LLaMPPL's ``smc_standard`` over its HF backend, if LLaMPPL is installed (else None).

    LLaMPPL undoes each ``twist`` before the next ``step`` (``smc_standard`` calls ``untwist``) and
    ``finish()`` undoes the last one, so a twist is the *whole* current potential, not an
    increment: ``twist(psi_t / beta)`` at every step and, at the end, ``finish(); score(r / beta)``.
    The particle's log-weight then changes by (psi_t - psi_{t-1})/beta per step and ends at the
    target pi0 · exp(r/beta), as ours does. (Twisting by the increment, as an earlier version of
    this runner did, left final weights that carry no reward.) The run returns the weighted
    reward mean, ESS and standard error, which ``main`` compares with ours before timing."""
    try:
        import asyncio

        import numpy as np
        from genlm.backend.llm import AsyncTransformer
        from llamppl import CachedCausalLM, LMContext, Model, smc_standard
    except ImportError:
        return None
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    lm = CachedCausalLM(AsyncTransformer(prior.model, prior.tokenizer, batch_size=N))

    def reward(text: str) -> float:
        return vader.polarity_scores(text)["compound"]

    def text_of(ctx) -> str:
        """The continuation as ours decodes it (special tokens dropped), so both score the same text."""
        return prior.tokenizer.decode(ctx.tokens[ctx.prompt_token_count:], skip_special_tokens=True)

    class SentimentSteering(Model):
        def __init__(self):
            super().__init__()
            self.ctx = LMContext(lm, args.prompt)

        async def step(self):
            await self.sample(self.ctx.next_token())
            text = text_of(self.ctx)
            if self.ctx.token_count >= T:
                self.finish()  # undoes the last twist
                self.score(reward(text) / args.beta)  # the final weight carries r/beta
            else:
                self.twist(reward(text) / args.beta)  # psi_t/beta; undone before the next step

    def run(seed: int = 0):
        lm.clear_cache()  # no KV reuse across repeats
        np.random.seed(seed)  # LLaMPPL draws from numpy's and torch's global generators
        torch.manual_seed(seed)
        particles = asyncio.run(smc_standard(SentimentSteering(), N, resampling_method="systematic"))
        assert all(p.ctx.token_count == T for p in particles)
        return weighted_reward([p.weight for p in particles], [reward(text_of(p.ctx)) for p in particles])

    return run


def same_within_noise(ours: list[dict], theirs: list[dict], sigmas: float = 3.0) -> tuple[bool, str]:
    """Mean weighted reward over seeded runs of each side agree within ``sigmas`` standard errors.

    The error of a side's mean is taken from the spread between its runs (a single run's
    weighted standard error understates it: resampled particles are copies), and never below
    the within-run error."""
    def pool(runs):
        k = len(runs)
        m = sum(r["mean"] for r in runs) / k
        within = math.sqrt(sum(r["se"] ** 2 for r in runs)) / k
        between = math.sqrt(sum((r["mean"] - m) ** 2 for r in runs) / (k - 1) / k) if k > 1 else 0.0
        return m, max(within, between)

    (m1, s1), (m2, s2) = pool(ours), pool(theirs)
    z = abs(m1 - m2) / max(math.sqrt(s1**2 + s2**2), 1e-12)
    def runs(rs):
        return ", ".join(f"{r['mean']:.3f}" for r in rs)

    text = (f"weighted reward mean over {len(ours)} seeded runs each: ours {m1:.3f} ± {s1:.3f} ({runs(ours)}), "
            f"llamppl {m2:.3f} ± {s2:.3f} ({runs(theirs)}); |difference| = {z:.1f} standard errors")
    return z <= sigmas, text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="32x32,64x64", help="NxT pairs, comma separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default", choices=["default", *LLAMA_SHAPES],
                    help="the default SmolLM2 model, or a config-built Llama with random weights (no download)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--proposal", default="bootstrap", choices=["bootstrap", "tilted"])
    ap.add_argument("--lookahead", type=int, default=8)
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    ap.add_argument("--memory-runs", type=int, default=3, help="subprocesses per method (median reported)")
    ap.add_argument("--profile", action="store_true", help="cProfile one SMC run per config")
    ap.add_argument("--llamppl", action="store_true", help="also time LLaMPPL's smc_standard if installed")
    ap.add_argument("--child", choices=["generate", "smc"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    prior, smc_prior = load(args)
    params = sum(p.numel() for p in prior.model.parameters())
    print(f"model={args.model} ({params / 1e6:.1f}M parameters, {prior.model.dtype}) device={prior.model.device} threads={torch.get_num_threads()} prompt={args.prompt!r} "
          f"reward=Sentiment beta={args.beta} proposal={args.proposal}")
    for cfg in args.configs.split(","):
        N, T = (int(x) for x in cfg.lower().split("x"))
        run = runners(prior, smc_prior, N, T, args)
        run["generate"](), run["smc"]()  # warm-up
        times = {"generate": [], "smc": []}
        for _ in range(args.repeats):  # alternate, so drift in machine load hits both
            for name in times:
                times[name].append(timed(run[name]))
        tg, ts = min(times["generate"]), min(times["smc"])
        res = run["smc"]()
        tokens = N * T
        print(f"\nN={N} T={T} ({tokens} tokens), best of {args.repeats}")
        for name, best in (("model.generate", tg), ("smc", ts)):
            runs = ", ".join(f"{t:.2f}" for t in times[name.split(".")[-1]])
            print(f"  {name:<15} {best:8.3f} s  {tokens / best:8.1f} tok/s   (all runs: {runs})")
        print(f"  time ratio smc/generate = {ts / tg:.3f}   (resampled at {int(res.info['resampled'].sum())} of {T} steps, "
              f"reward mean {res.reward_mean().item():.3f})")
        if not args.no_memory:
            mg, ms = peak_memory("generate", N, T, args), peak_memory("smc", N, T, args)
            mib = 1 << 20
            ratio = ms["delta_bytes"] / max(1, mg["delta_bytes"])
            print(f"  peak memory above the loaded model (median of {args.memory_runs} processes): generate "
                  f"{mg['delta_bytes'] / mib:.1f} MiB, smc {ms['delta_bytes'] / mib:.1f} MiB, ratio = {ratio:.3f}")
            print(f"  peak memory of the whole process: generate {mg['peak_bytes'] / mib:.0f} MiB, "
                  f"smc {ms['peak_bytes'] / mib:.0f} MiB, ratio = {ms['peak_bytes'] / mg['peak_bytes']:.3f}")
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(run["smc"])
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        if args.llamppl:
            lrun = llamppl_runner(prior, N, T, args)
            if lrun is None:
                print("  llamppl: not installed (pip install llamppl)")
                continue
            # Like with like: both must reach the same weighted reward mean before their times mean
            # anything. The llamppl runs of the check are the timed ones; their times are shown only
            # if the check passes.
            ours, theirs, tl_all, paired = [], [], [], []
            for k in range(max(2, args.repeats)):
                t0 = time.perf_counter()
                r = run["smc"](100 + k)
                t_ours = time.perf_counter() - t0
                ours.append(weighted_reward(r.log_weights[0], r.rewards[0]))
                t0 = time.perf_counter()
                theirs.append(lrun(100 + k))
                tl_all.append(time.perf_counter() - t0)
                paired.append(tl_all[-1] / t_ours)  # back to back: the same machine load for both
            ok, text = same_within_noise(ours, theirs)
            print(f"  check: {text}")
            if not ok:
                print("  llamppl: times NOT reported, the two samplers disagree (fix the runner before comparing times)")
                continue
            tl = min(tl_all)
            print(f"  llamppl smc     {tl:8.3f} s  {tokens / tl:8.1f} tok/s   (all runs: {', '.join(f'{t:.2f}' for t in tl_all)})")
            med = sorted(paired)[len(paired) // 2]
            print(f"  time ratio llamppl/generate = {tl / tg:.3f}   smc/generate = {ts / tg:.3f}   llamppl/smc = {tl / ts:.3f}"
                  f"   (median of back-to-back pairs llamppl/smc = {med:.3f})")


if __name__ == "__main__":
    main()
