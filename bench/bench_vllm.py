"""vLLM backend against plain vLLM sampling, with the transformers equivalents, in one run.

Every method makes exactly N×T tokens of the same prompt: plain sampling with ``ignore_eos`` /
``min_new_tokens=T``, the samplers with an EOS id the model never emits, so no sequence ends early.
Methods run in alternating order, ``--repeats`` times after one warm-up each, repeat r of every
method with seed r (the same random path, e.g. SMC's resamplings, in every run of the script); the
table gives medians and ratios to the plain sampling of the same backend:

    vllm generate   llm.generate(TokensPrompt, SamplingParams(n=N, max_tokens=T, ignore_eos=True))
    vllm is         Posterior(VLLMPrior, Sentiment, beta).sample(method="is")
    vllm smc bB     ... method="smc", block_size=B (streamed: each particle's request keeps running
                    in the engine, read block by block; only duplicates start new requests after
                    resampling; posterior/samplers/smc_model.py)
    vllm smc bB step  the same with decode_ahead=False (one continue_prefixes call per block), --step
    hf generate     model.generate(do_sample=True, num_return_sequences=N, min_new_tokens=T)
    hf is / hf smc  the same samplers over HFPrior (SMC token by token from the KV cache)

    python bench/bench_vllm.py [--n 32] [--tokens 32] [--repeats 5] [--blocks 8,16] [--threads 1]
                               [--kv-block-size 32] [--no-hf] [--step] [--profile] [--in-process] [--chat]

The vLLM CPU worker computes on one core (it reserves one for the frontend), so the HF rows run
with one torch thread by default (``--threads``).

``--profile`` adds a breakdown of one SMC-over-vLLM run per block size: waiting for the engine vs
the rest, continuations submitted, engine steps and their times. ``--in-process`` runs vLLM's engine
core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): its steps are then in lockstep with SMC.

Targets (issue 8): SMC over vLLM <= 1.3x vLLM's plain sampling, IS over vLLM <= 1.1x; issue 15:
SMC over vLLM at block 8 <= 1.15x, blocks 1-32 all <= 1.3x (decode-ahead).

Measured (2026-12-03, 2 cores, load 1-2; 32 x 32, 5 alternating repeats, medians; x plain),
streamed, engine core in its own process / in process, with seed r for repeat r (as now): is 1.00 /
0.97, smc b1 1.57 / 1.39, b8 1.27 / 1.27, b16 1.12 / 1.09, b32 0.97 / 0.88. Two earlier runs that
day, each repeat with its own seeds: is 0.98-1.06 / 1.02-1.04, b1 1.61-1.74 / 1.58-1.61, b8
1.36-1.37 / 1.29-1.48, b16 1.23-1.26 / 1.28-1.46, b32 1.02 / 1.06-1.18 (3- and 1-repeat runs: b8
1.16-1.35, b1 1.34-1.57; before streams, one continue_prefixes call per block group: b8 1.73, b1
2.71). With --chat (33 prompt tokens, a full 32-token block prefix-cached), own / in process: b1
1.59 / 1.40, b8 1.57 / 1.37, b16 1.27 / 1.26, b32 1.01 / 0.98.
Profile (in process): SMC takes exactly the plain run's 32 engine steps and 0.05 s of Python at
b8; the rest is the steps that prefill the duplicates' prompt + prefix (b8, seed 0: 42 duplicates
re-feeding 718 tokens, none cached, (the slowest engine steps: 0.29, 0.78 and 1.17 s,
against ~0.15 s for a decode step)).
Systematic resampling (the default) already makes the fewest duplicates any unbiased scheme can
(ancestor a survives with probability min(1, N w_a), the bound E[offspring] gives), and vLLM 0.32
has no fork of a running request's KV and prefix-caches only full 32-token blocks (the CPU kernel
takes no smaller one), so each duplicate pays its prefill. In its own process the engine has
started the next step when SMC's weights are known, so new requests join one step late at every
boundary (--profile: 35-36 engine steps at b8, 34 at b16, 33 at b32, 40 at b1, against 32 in process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

PROMPT = "The movie was"
WARM_UP_SEED = 10_000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", default="8,16", help="SMC block sizes over vLLM")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template (SmolLM2's is >= 32 tokens: a full prefix-cached KV block)")
    parser.add_argument("--no-hf", action="store_true", help="vLLM rows only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the HF rows (vLLM's CPU worker computes on one core, reserving one for the frontend)")
    parser.add_argument("--kv-block-size", type=int, default=None, help="vLLM KV-cache block size (default: VLLMPrior's)")
    parser.add_argument("--profile", action="store_true", help="time engine calls inside one SMC-over-vLLM run")
    parser.add_argument("--step", action="store_true", help="also SMC over vLLM with decode_ahead=False")
    parser.add_argument("--in-process", action="store_true",
                        help="vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): engine steps in lockstep with SMC")
    args = parser.parse_args(argv)
    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is built

    import vllm
    from vllm.inputs import TokensPrompt

    import posterior as pst
    from posterior.priors.vllm import VLLMPrior

    N, T = args.n, args.tokens
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine_kwargs = {} if args.kv_block_size is None else {"block_size": args.kv_block_size}
    owner = pst.load_default_prior(backend="vllm", **engine_kwargs)
    engine_start = time.perf_counter() - t0
    never = owner.vocab_size - 1  # an id the model does not emit within T steps: no sequence ends early
    vprior = VLLMPrior(owner.llm, eos_token_ids=[never], chat=args.chat)
    reward = pst.rewards.Sentiment()
    vpost = pst.Posterior(vprior, reward, beta=args.beta)
    prompt_ids = vprior.encode_prompts([args.prompt])[0]
    blocks = [int(b) for b in args.blocks.split(",") if b]
    # Repeat r of every method runs with seed r (warm-ups with WARM_UP_SEED), so a sampler's random
    # path (how often SMC resamples, how many duplicates it starts) is the same in every run of this
    # script: runs differ by the machine only.

    def vllm_generate(seed: int):
        params = vllm.SamplingParams(n=N, max_tokens=T, ignore_eos=True, seed=seed)
        out = owner.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
        assert all(len(c.token_ids) == T for c in out[0].outputs)

    def sampler(post, method, **options):
        def run(seed: int):
            g = torch.Generator().manual_seed(seed)
            res = post.sample(n=N, method=method, max_new_tokens=T, prompts=[args.prompt], generator=g, **options)
            assert int(res.lengths.min()) == T, res.lengths.min()

        return run

    methods = {"vllm generate": vllm_generate, "vllm is": sampler(vpost, "is")}
    for b in blocks:
        methods[f"vllm smc b{b}"] = sampler(vpost, "smc", block_size=b)
        if args.step:
            methods[f"vllm smc b{b} step"] = sampler(vpost, "smc", block_size=b, decode_ahead=False)
    if not args.no_hf:
        hprior = pst.load_default_prior()
        model, tok = hprior.model, hprior.tokenizer
        hf = pst.HFPrior(model, tok, eos_token_ids=[never], chat=args.chat)
        hpost = pst.Posterior(hf, reward, beta=args.beta)
        ids = torch.tensor([hf.encode_prompts([args.prompt])[0]])
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def hf_generate(seed: int):
            torch.manual_seed(seed)  # generate() samples from torch's global generator
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, num_return_sequences=N, max_new_tokens=T, min_new_tokens=T,
                                     top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.eos_token_id)
            assert out.shape[1] - enc["input_ids"].shape[1] == T

        methods.update({"hf generate": hf_generate, "hf is": sampler(hpost, "is"), "hf smc": sampler(hpost, "smc")})

    if args.profile:  # first, so that a long run still reports where the time goes
        profile_smc(vprior, vpost, N, T, blocks, args)
    for name, run in methods.items():  # warm-up
        t = time.perf_counter()
        run(WARM_UP_SEED)
        print(f"  warm-up: {name} {time.perf_counter() - t:.3f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.repeats):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))  # alternate: drift hits all alike
        for name in order:
            t = time.perf_counter()
            methods[name](r)
            times[name].append(time.perf_counter() - t)
            print(f"  repeat {r}: {name} {times[name][-1]:.3f} s", flush=True)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"N x T = {N} x {T} ({N * T} tokens), prompt {args.prompt!r} ({len(prompt_ids)} tokens{', chat template' if args.chat else ''}), Sentiment reward, beta = {args.beta}, "
          f"{args.repeats} repeats (medians); torch threads {torch.get_num_threads()}; vLLM engine start {engine_start:.1f} s, "
          f"KV block {owner.llm.llm_engine.vllm_config.cache_config.block_size} tokens, engine core "
          f"{'in this process' if os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING') == '0' else 'in its own process'}")
    print(f"{'method':<16}{'median s':>10}{'min s':>9}{'max s':>9}{'tok/s':>9}{'x plain':>9}")
    for name in methods:
        base = med["vllm generate"] if name.startswith("vllm") else med["hf generate"]
        ts = times[name]
        print(f"{name:<16}{med[name]:>10.3f}{min(ts):>9.3f}{max(ts):>9.3f}{N * T / med[name]:>9.0f}{med[name] / base:>9.2f}")
    if not args.no_hf:
        print(f"vllm generate / hf generate = {med['vllm generate'] / med['hf generate']:.2f}")

    owner.close()


def profile_smc(vprior, vpost, N, T, blocks, args) -> None:
    """Wall time of one SMC run split into waiting for the engine (the stream's ``wait``) and
    everything else (rewards, texts, resampling, submitting); continuations submitted, and the prompt +
    prefix tokens the duplicates' requests prefill again (vLLM shares only full 32-token prefix-cached blocks)."""
    from posterior.priors.vllm import VLLMStream

    engine = vprior.llm.llm_engine
    for b in blocks:
        spent, submitted, refed, steps = [], [0], [0], []
        inner_step = engine.step

        def timed_step():
            t = time.perf_counter()
            out = inner_step()
            steps.append(time.perf_counter() - t)
            return out

        class Timed(VLLMStream):
            def wait(self, need):
                t = time.perf_counter()
                super().wait(need)
                spent.append(time.perf_counter() - t)

            def submit(self, prompt_ids, prefix, *a, **kw):
                submitted[0] += 1
                if submitted[0] > N:  # a duplicate: its prompt + prefix is prefilled again
                    refed[0] += len(prompt_ids) + len(prefix)
                return super().submit(prompt_ids, prefix, *a, **kw)

        vprior.open_stream = lambda: Timed(vprior)
        engine.step = timed_step
        try:
            t = time.perf_counter()
            g = torch.Generator().manual_seed(0)  # the random path of repeat 0
            vpost.sample(n=N, method="smc", max_new_tokens=T, prompts=[args.prompt], generator=g, block_size=b)
            total = time.perf_counter() - t
        finally:
            del vprior.open_stream
            del engine.step
        print(f"profile smc b{b} (streamed): {total:.3f} s total, waiting for the engine {sum(spent):.3f} s in {len(spent)} waits, "
              f"the rest {total - sum(spent):.3f} s; {submitted[0]} continuations submitted ({submitted[0] - N} after resampling, "
              f"re-feeding {refed[0]} prompt + prefix tokens); "
              f"{len(steps)} engine steps, median {statistics.median(steps) * 1e3:.0f} ms, slowest {', '.join(f'{x * 1e3:.0f}' for x in sorted(steps)[-3:])} ms")


if __name__ == "__main__":  # vLLM starts engine processes: keep the guard
    main()
