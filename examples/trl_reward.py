"""A reward function written for TRL's GRPOTrainer, used unchanged as the posterior's reward.

    python examples/trl_reward.py
    python examples/trl_reward.py --toy   # a tiny random model at small sizes

Takes about 31 s here at load 5 on the default model (weights cached; 2026-12-05, this project's 2
CPU cores shared with other jobs, one thread). ``--toy``: a tiny random model, about 25 s at load 6,
mostly imports (what CI runs).
"""

import math

import argparse

import torch

import posterior as pst
from posterior.testing import tiny_hf_prior
from posterior.threads import default_threads


def reward_len(completions, **kwargs):  # from TRL's GRPO documentation, verbatim
    return [-abs(20 - len(completion)) for completion in completions]


def mentions(completions, keyword, **kwargs):  # a dataset column ("keyword") arrives as a kwarg
    return [1.0 if k in c.lower() else 0.0 for c, k in zip(completions, keyword)]


ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--toy", action="store_true", help="a tiny random model at small sizes (what CI runs)")
args = ap.parse_args()
torch.set_num_threads(default_threads())  # one thread per free core: the fast choice on a shared machine
prior = tiny_hf_prior("llama") if args.toy else pst.load_default_prior()
prompts = ["Write a short title for a cooking blog:", "Name a city in France:"]
reward = pst.rewards.from_trl(reward_len) + pst.rewards.from_trl(mentions, keyword=["food", "paris"])
out = pst.generate(prior.model, prior.tokenizer, prompts, reward=reward, beta=5.0, method="smc", n=4, max_new_tokens=10)
res = out.result
for p, prompt in enumerate(prompts):
    print(f"=== {prompt!r}")
    for text, r, lw in zip(res.texts[p], res.rewards[p].tolist(), res.log_weights[p].tolist()):
        print(f"  [r={r:+.1f} w={math.exp(lw):.2f}] {text!r} ({len(text)} chars)")
print(res.info["runs"])  # a reward that reads prompts is sampled one prompt at a time
