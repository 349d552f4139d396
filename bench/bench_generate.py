"""Throughput of our batched decode against plain ``model.generate`` on the default model.

Both produce exactly N×T tokens for one prompt (EOS disabled in both: ``min_new_tokens=T`` for
generate, an unused stop id for ours), measured in one run, alternating, best of ``--repeats``.
Also times the whole ``Posterior.sample(method="is")`` call (decode + VADER rewards + weights).

    python bench/bench_generate.py [--n 32] [--tokens 32] [--repeats 3] [--device cpu] [--threads 1]
"""

import argparse
import time

import torch

import posterior as pst


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", default="The movie was")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prior = pst.load_default_prior(device=args.device)
    model, tok = prior.model, prior.tokenizer
    never = prior.vocab_size - 1  # an id the model does not emit in T steps: no early stop
    ours = pst.HFPrior(model, tok, eos_token_ids=[never])
    ids = ours.encode_prompts([args.prompt])
    enc = tok([args.prompt], return_tensors="pt").to(model.device)
    g = torch.Generator(device=model.device).manual_seed(0)
    N, T = args.n, args.tokens

    def run_generate():
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, num_return_sequences=N, max_new_tokens=T,
                                 min_new_tokens=T, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.eos_token_id)
        assert out.shape[1] - enc.input_ids.shape[1] == T

    def run_ours():
        c = ours.sample(ids, N, T, generator=g)
        assert int(c.lengths.min()) == T

    post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=0.1)

    def run_is():
        post.sample(n=N, method="is", max_new_tokens=T, prompts=[args.prompt], generator=g)

    run_generate(), run_ours()  # warm-up
    t_gen, t_ours = [], []
    for _ in range(args.repeats):  # alternate so drift hits both
        t_gen.append(best_time(run_generate, 1))
        t_ours.append(best_time(run_ours, 1))
    tg, to = min(t_gen), min(t_ours)
    ti = best_time(run_is, args.repeats)
    tokens = N * T
    print(f"device={model.device} threads={torch.get_num_threads()} N={N} T={T} tokens={tokens}")
    print(f"model.generate        {tg:8.3f} s  {tokens / tg:8.1f} tok/s")
    print(f"posterior decode      {to:8.3f} s  {tokens / to:8.1f} tok/s   time ratio ours/generate = {to / tg:.3f}")
    print(f"Posterior.sample(is)  {ti:8.3f} s  (decode until EOS + VADER + weights; ratio to generate {ti / tg:.3f})")


if __name__ == "__main__":
    main()
