"""An exact toy prior: enumerate the posterior and check a sampler against it.

    python examples/exact_toy.py

Takes about 33 s here (2026-12-05, this project's 2 CPU cores shared with other jobs at load 5, one
thread), almost all of it importing torch; the sampling itself is a second. No model is loaded, so
there is no ``--toy`` switch: CI runs it as it is.
"""

import torch

import posterior as pst
from posterior.exact import empirical, exact_posterior, sequence_keys, total_variation
from posterior.threads import default_threads

torch.set_num_threads(default_threads())  # one thread per free core: the fast choice on a shared machine

# Vocabulary ["a", "b", <eos>]; each step draws a, b, EOS with probabilities 0.5, 0.3, 0.2.
prior = pst.CallablePrior(["a", "b", "<eos>"], lambda ids: torch.tensor([0.5, 0.3, 0.2]).log().expand(ids.shape[0], 3))
reward = pst.rewards.Callable(lambda texts: [float(t.count("b")) for t in texts], name="count_b")
post = pst.Posterior(prior, reward, beta=0.5)

exact = exact_posterior(prior, reward, beta=0.5, max_new_tokens=4)
res = post.sample(n=20_000, method="is", max_new_tokens=4, seed=0)
tv = total_variation(empirical(sequence_keys(res.tokens, res.lengths)[0], res.log_weights[0]), exact.prob())
print(f"exact log Z = {exact.log_Z:.4f}   IS log Z = {res.log_Z.item():.4f}")
print(f"exact KL(pi*||pi0) = {exact.kl:.4f}   IS estimate = {res.kl().item():.4f}")
print(f"TV(IS, exact) = {tv:.4f} with ESS {res.ess.item():.0f}")
