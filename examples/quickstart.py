"""Sample a sentiment-aligned posterior of SmolLM2-135M-Instruct and compare methods.

    python examples/quickstart.py
    python examples/quickstart.py --toy   # a tiny random model at small sizes

Takes about 720 s on the default model here (weights cached; 2026-12-05, this project's 2 CPU cores
shared with other jobs at load 6, one thread): 580 s of it exact rejection sampling, which accepts
about exp(-10 (1 - r)) of the prior's draws at beta 0.1 (it found its 8 samples within the 2000-draw
limit). ``--toy``: a tiny random model at small sizes, about 43 s at load 5-6, mostly imports (what
CI runs).
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
post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=0.1)  # pi*(x) ∝ pi0(x) exp(r(x)/0.1)

n, tokens, max_draws = (4, 8, 200) if args.toy else (8, 24, 2000)
for method, options in [("is", {}), ("bon", {"best_of": 4}), ("rejection", {"reward_upper_bound": 1.0, "max_draws": max_draws})]:
    try:
        res = post.sample(n=n, method=method, max_new_tokens=tokens, prompts=["The movie was"], seed=0, **options)
    except pst.DegenerateWeightsError as e:  # rejection at beta=0.1 accepts ~exp(-10 (1 - r)): may run out
        print(f"{method}: {e}")
        continue
    print(res.format_summary())
    best = int(res.rewards[0].argmax())  # best by reward (bon's weights are uniform: argmax would be sample 0)
    print(f"  best sample (highest reward): {res.texts[0][best]!r} (reward {res.rewards[0, best].item():+.3f})\n")
