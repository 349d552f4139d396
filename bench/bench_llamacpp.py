"""llama.cpp backend: plain sampling vs token-level and block SMC, beside HF, in one run.

Every method makes exactly N×T tokens of the same prompt: the samplers run with an EOS id the
model never emits, llama.cpp's own generation and HF's ``generate`` with no EOS stop, so no
sequence ends early. Methods run in alternating order, ``--repeats`` times after one warm-up
each, repeat r of every method with seed r (SMC's resamplings are the same in every run of the
script); the table gives medians and ratios to the plain sampling of the same backend:

    llama generate      llama.cpp's own batched generation over the same context settings: the
                        prompt decoded once and copied to N sequences, one llama_decode of N tokens
                        per step, tokens drawn by llama.cpp's sampler (llama_sampler_init_dist)
    llama plain         Posterior(LlamaCppPrior, Sentiment, beta).sample(method="is"): pi0 draws
    llama smc bB        method="smc", block_size=B (twist "auto": the reward on prefixes every B
                        tokens, resampling when the ESS < N/2); duplicates fork their KV cache
                        (llama_memory_seq_cp), nothing is decoded twice
    hf generate         model.generate(do_sample=True, num_return_sequences=N, min_new_tokens=T)
    hf plain / hf smc bB  the same samplers over HFPrior (dequantised float32 weights)
    llama[f32] ...      the llama.cpp rows again on weights="f32" (a float32 copy of the GGUF)
    vllm plain / smc bB with --vllm: the same samplers over VLLMPrior (block sizes > 1)

    python bench/bench_llamacpp.py [--n 16] [--tokens 32] [--repeats 3] [--blocks 1,8] [--threads 1] [--no-hf] [--weights stored,f32] [--vllm]

Peak memory: the process's peak resident set (VmHWM) after the llama.cpp rows, before HF loads
(the llama.cpp rows' own peak), and at the end; plus the llama.cpp KV cache's size (n_ctx cells).

Targets (issue 27): SMC <= 1.05x plain sampling on llama.cpp at every block size; plain sampling on
llama.cpp faster than HF's. Measured (2026-12-05, 2 shared cores, load ~1, 16 x 32, 3 repeats,
medians; docs/benchmarks.md#llamacpp): plain sampling 11.18 s on the stored Q4_1 weights, 8.48 s on
weights="f32", 12.51 s on HF (0.89x and 0.68x HF); SMC b1 / b8 1.04x / 0.96x plain (Q4_1), 1.00x /
0.99x (f32). Peak RSS 1502 MiB after the llama.cpp rows, 2305 MiB with HF; KV cache 180 MiB each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

PROMPT = "The movie was"
WARM_UP_SEED = 10_000


def peak_rss_mib() -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def llama_generate_runner(prior, prompt_ids, N: int, T: int):
    """llama.cpp's own plain generation on ``prior``'s context (its settings, its cache): decode the
    prompt once, copy it to N sequences, then T steps of one llama_decode of N tokens with tokens
    drawn by llama.cpp's sampler chain (no EOS stop)."""
    import numpy as np

    import llama_cpp as ll

    def run(seed: int):
        with prior._lock:
            prior._flush()
            ids = prior._alloc(N)
            try:
                L = len(prompt_ids)
                prior._decode(prompt_ids, list(range(L)), [ids[0]] * L, [False] * (L - 1) + [True])
                for s in ids[1:]:
                    ll.llama_memory_seq_cp(prior._mem, ids[0], s, -1, -1)
                chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
                try:
                    toks = [ll.llama_sampler_sample(chain, prior._ctx, -1)] * N  # the prompt's last token (its one output)
                    for t in range(T - 1):
                        prior._decode(toks, [L + t] * N, ids, [True] * N)
                        toks = [ll.llama_sampler_sample(chain, prior._ctx, i) for i in range(N)]
                finally:
                    ll.llama_sampler_free(chain)
                assert len(toks) == N and np.all(np.asarray(toks) >= 0)
            finally:
                prior._retire(ids)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", default="1,8", help="SMC block sizes (1: token-level)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp and torch threads")
    parser.add_argument("--no-hf", action="store_true", help="no HF rows")
    parser.add_argument("--weights", default="stored,f32", help="llama.cpp weights variants (LlamaCppPrior weights=)")
    parser.add_argument("--vllm", action="store_true", help="add vLLM rows (plain, SMC at block sizes > 1; engine start ~30 s)")
    args = parser.parse_args(argv)

    import posterior as pst
    from posterior.priors.llamacpp import LlamaCppPrior

    N, T = args.n, args.tokens
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    owner = pst.load_default_prior(backend="llamacpp", n_threads=args.threads)
    load_s = time.perf_counter() - t0
    never = owner.vocab_size - 1  # an id the model does not emit within T steps: no sequence ends early
    path = owner.path
    owner.close()
    reward = pst.rewards.Sentiment()
    blocks = [int(b) for b in args.blocks.split(",") if b]
    variants = [w for w in args.weights.split(",") if w]

    def sampler(post, method, **options):
        def run(seed: int):
            g = torch.Generator().manual_seed(seed)
            res = post.sample(n=N, method=method, max_new_tokens=T, prompts=[args.prompt], generator=g, **options)
            assert int(res.lengths.min()) == T, res.lengths.min()

        return run

    def table(methods):
        for name, run in methods.items():  # warm-up
            t = time.perf_counter()
            run(WARM_UP_SEED)
            print(f"  warm-up: {name} {time.perf_counter() - t:.3f} s", flush=True)
        times = {name: [] for name in methods}
        for r in range(args.repeats):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))  # alternate: drift hits all alike
            for name in order:
                t = time.perf_counter()
                methods[name](r)
                times[name].append(time.perf_counter() - t)
                print(f"  repeat {r}: {name} {times[name][-1]:.3f} s", flush=True)
        return times

    # the llama.cpp rows of every weights variant alternate in one table: "llama" runs the file's
    # own weights, "llama[f32]" the float32 copy (weights="f32": HF's numbers)
    lpriors, llama_methods, group = {}, {}, {}
    for w in variants:
        tag = "llama" if w == "stored" else f"llama[{w}]"
        lprior = lpriors[tag] = LlamaCppPrior.from_gguf(path, weights=w, eos_token_ids=[never], n_threads=args.threads)
        lpost = pst.Posterior(lprior, reward, beta=args.beta)
        prompt_ids = lprior.encode_prompts([args.prompt])[0]
        rows = {f"{tag} generate": llama_generate_runner(lprior, prompt_ids, N, T), f"{tag} plain": sampler(lpost, "is")}
        for b in blocks:
            rows[f"{tag} smc b{b}"] = sampler(lpost, "smc", block_size=b)
        llama_methods.update(rows)
        group.update({name: tag for name in rows})
    times = table(llama_methods)
    llama_peak = peak_rss_mib()
    resampled = {}
    lpost = pst.Posterior(next(iter(lpriors.values())), reward, beta=args.beta)
    for b in blocks:  # how often SMC resampled in repeat 0's random path (resampling is on)
        res = lpost.sample(n=N, method="smc", max_new_tokens=T, prompts=[args.prompt], generator=torch.Generator().manual_seed(0), block_size=b)
        resampled[b] = int(res.info["resampled"].sum())
    if not args.no_hf:
        hprior = pst.load_default_prior()
        model, tok = hprior.model, hprior.tokenizer
        hf = pst.HFPrior(model, tok, eos_token_ids=[never])
        hpost = pst.Posterior(hf, reward, beta=args.beta)
        ids = torch.tensor([hf.encode_prompts([args.prompt])[0]])
        assert ids[0].tolist() == prompt_ids, (ids[0].tolist(), prompt_ids)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def hf_generate(seed: int):
            torch.manual_seed(seed)  # generate() samples from torch's global generator
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, num_return_sequences=N, max_new_tokens=T, min_new_tokens=T,
                                     top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.eos_token_id)
            assert out.shape[1] - enc["input_ids"].shape[1] == T

        hf_methods = {"hf generate": hf_generate, "hf plain": sampler(hpost, "is")}
        for b in blocks:
            hf_methods[f"hf smc b{b}"] = sampler(hpost, "smc", block_size=b)
        times.update(table(hf_methods))
        group.update({name: "hf" for name in hf_methods})
        del hprior, hf, hpost, model
    if args.vllm:  # the same tokens over vLLM's CPU engine (the dequantised weights, as HF)
        vowner = pst.load_default_prior(backend="vllm")
        vprior = pst.VLLMPrior(vowner.llm, eos_token_ids=[never])
        vpost = pst.Posterior(vprior, reward, beta=args.beta)
        vllm_methods = {"vllm plain": sampler(vpost, "is")}
        for b in blocks:
            if b > 1:  # vLLM runs blocks (decode-ahead); token-level SMC is not its mode
                vllm_methods[f"vllm smc b{b}"] = sampler(vpost, "smc", block_size=b)
        times.update(table(vllm_methods))
        group.update({name: "vllm" for name in vllm_methods})
        vowner.close()

    lprior = next(iter(lpriors.values()))
    s = lprior.settings
    kv_mib = lprior.kv_cache_bytes() / 2**20
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"N x T = {N} x {T} ({N * T} tokens), prompt {args.prompt!r}, Sentiment reward, beta = {args.beta}, "
          f"{args.repeats} repeats (medians), {args.threads} thread(s); llama.cpp: {path.name} (weights: "
          f"{', '.join(variants)}), load {load_s:.2f} s, flash attention {s['flash_attn']}, KV {s['kv_type']}, n_ubatch {s['n_ubatch']}")
    print(f"{'method':<24}{'median s':>10}{'min s':>9}{'max s':>9}{'tok/s':>9}{'x plain':>9}{'x generate':>11}{'x hf plain':>11}")
    for name in times:
        tag = group[name]
        plain = med[f"{tag} plain"]
        gen = med.get(f"{tag} generate", math.nan)
        hf = med.get("hf plain", math.nan)
        ts = times[name]
        print(f"{name:<24}{med[name]:>10.3f}{min(ts):>9.3f}{max(ts):>9.3f}{N * T / med[name]:>9.0f}{med[name] / plain:>9.2f}"
              f"{med[name] / gen:>11.2f}{med[name] / hf:>11.2f}")
    print("SMC resamplings in repeat 0's path: " + ", ".join(f"b{b}: {k} of {T // b} boundaries" for b, k in resampled.items()))
    print(f"peak RSS: {llama_peak:.0f} MiB after the llama.cpp rows (before HF loads), {peak_rss_mib():.0f} MiB at the end; "
          f"llama.cpp KV cache {kv_mib:.0f} MiB per prior ({s['n_ctx']} cells, {s['kv_type']})")
    for lp in lpriors.values():
        lp.close()


if __name__ == "__main__":
    main()
