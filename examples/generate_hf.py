"""pst.generate as a drop-in for model.generate: same inputs, sequences shaped the same way,
drawn from the sentiment-aligned posterior pi*(x) ∝ pi0(x) exp(r(x)/beta) of SmolLM2-135M.

    python examples/generate_hf.py
    python examples/generate_hf.py --toy   # a tiny random model at small sizes

Takes about 55 s here at load 6 on the default model (weights cached; 2026-12-05, this project's 2
CPU cores shared with other jobs, one thread). ``--toy``: a tiny random model, about 37 s at load 6,
mostly imports (what CI runs).
"""

import argparse

import torch

import posterior as pst
from posterior.testing import tiny_hf_prior
from posterior.threads import default_threads

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--toy", action="store_true", help="a tiny random model at small sizes (what CI runs)")
args = ap.parse_args()
torch.set_num_threads(default_threads())  # one thread per free core: the fast choice on a shared machine
prior = tiny_hf_prior("llama") if args.toy else pst.load_default_prior()  # SmolLM2-135M-Instruct, offline
model, tokenizer = prior.model, prior.tokenizer  # plain transformers objects
tokenizer.padding_side = "left"  # as for model.generate on a batch
if tokenizer.pad_token is None:  # the default model's tokenizer has one; a bare tokenizer may not
    tokenizer.pad_token = tokenizer.eos_token
inputs = tokenizer(["The movie was", "My neighbour is"], return_tensors="pt", padding=True)

# model.generate(**inputs, do_sample=True, num_return_sequences=4, max_new_tokens=16) becomes:
out = pst.generate(model, tokenizer, inputs, reward=pst.rewards.Sentiment(), beta=0.1,
                   method="smc", n=4, max_new_tokens=16, seed=0)

print(out.sequences.shape, "(P·n, prompt + new tokens), like model.generate")
print(out.note)
prompt_len = inputs["input_ids"].shape[1]
for text in tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True):
    print(f"  {text!r}")
print(out.result.format_summary())  # weights, ESS, log Z, KL(pi*||pi0) of the underlying samples
