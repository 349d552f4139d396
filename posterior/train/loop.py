"""The one training loop: fit a policy q to pi*(x) ∝ pi0(x) exp(r(x)/beta), or a twist psi_t to
the optimal twist psi*_t = beta log E_pi0[e^{r/beta} | x_1:t], with any objective.

The loop owns the optimiser, the generator, checkpoints, metrics and the running log Z; what one
step draws and which loss it takes is a :class:`posterior.train.steps.Step`, chosen by (what is
trained, objective): policies with :mod:`posterior.train.objectives`, twists
(``pst.twists.learned``) with :mod:`posterior.train.twist_objectives` ("ctl", "regression",
"fudge"). For a policy, each step:

1. draw ``batch_size`` continuations per prompt — from q under ``torch.no_grad`` (on-policy
   objectives) or from pi* with SMC / IS (``distill``);
2. score them: log pi0 and r without gradients, log q with ``policy.log_prob(..., grad=True)``;
3. update the running log Z estimate, compute the pure loss, backpropagate, take an Adam step;
4. log one JSON line of metrics and, every ``checkpoint_every`` steps, checkpoint.

Running log Z. Every batch of on-policy samples gives an unbiased estimate of
Z = sum_x pi0(x) e^{r(x)/beta}: Ẑ_b = mean_n pi0(x_n) e^{r(x_n)/beta} / q_b(x_n). The loop keeps
their sample-weighted mean, log Ẑ = log (sum_b N_b Ẑ_b / sum_b N_b) (still unbiased; a plain mean
in log space), which f-DPG needs and every KL-to-target estimate uses. For ``distill`` the batch
estimate is the sampler's own log Ẑ.

Metrics per step (estimates from the step's batch; a value that is not defined is None):
``reward_mean`` (E_q[r]; for distill the weighted E_pi*[r] of its samples), ``kl_prior``
(KL(q‖pi0) = E_q[log q - log pi0]), ``kl_target_forward`` (KL(pi*‖q) by self-normalised IS with q
as proposal: sum w̄ log w - log Ẑ), ``kl_target_reverse`` (KL(q‖pi*) = E_q[log q - log pi0 - r/beta]
+ log Ẑ), ``ess`` (of the weights pi*/q, in [1, N]), ``log_Z`` (running), ``log_Z_batch``, ``loss``.

Resume. With ``checkpoint_dir``, a checkpoint holds the trainable weights (LoRA adapter, full
weights or logit table), the optimiser state, the torch.Generator state, the step and the running
log Z. Calling ``fit`` again with the same directory continues from the latest checkpoint and, on
the CPU, ends bit-for-bit where an uninterrupted run ends (the same draws, in the same order).

Scale. Under ``accelerate launch`` (WORLD_SIZE > 1) the loop builds an ``accelerate.Accelerator``
itself (or takes ``accelerator=``): the policy is placed on its device, the optimiser is prepared,
an HF policy's training forward goes through DDP so gradients are averaged across processes, and
each rank draws its own batch (rank 0 from ``seed``, rank k from ``derive_seed(seed, "rank k")``);
rank 0 writes metrics, every rank writes its own checkpoint file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posterior.posterior import Posterior, _check_prompts
from posterior.samplers.common import check_proposal
from posterior.seeds import derive_seed
from posterior.train import checkpoint as ckpt
from posterior.train.steps import StepInput, check_twist, get_step

FORMAT = 1  # checkpoint payload version


@dataclass
class TrainRun:
    """What ``fit`` did: per-step metrics (all steps so far, resumed ones included)."""

    objective: str
    steps: int
    metrics: list[dict]
    log_Z: torch.Tensor  # (P,) running estimate of log Z per prompt, float64
    resumed_from: int | None = None  # the checkpoint step this call started from (None: fresh)
    seconds: float = 0.0  # wall time of this call
    checkpoint_dir: Path | None = None
    metrics_path: Path | None = None
    config: dict = field(default_factory=dict)

    def history(self, key: str) -> list:
        """One metric over the steps, e.g. ``run.history("kl_target_forward")``."""
        return [m.get(key) for m in self.metrics]

    @property
    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _auto_accelerator():
    """An Accelerator when launched as several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        # without cpu=True accelerate ignores a multi-process CPU launch (torchrun) and runs each rank alone
        return Accelerator(cpu=not torch.cuda.is_available())
    return None


def fit(
    post: Posterior,
    policy,
    *,
    objective: str,
    steps: int,
    batch_size: int,
    lr: float,
    max_new_tokens: int,
    prompts: Sequence[str] | str | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,  # steps between checkpoints (one is always written at the end)
    metrics_path: str | os.PathLike | None = None,  # default: checkpoint_dir/metrics.jsonl
    progress: bool = False,
    max_grad_norm: float | None = None,  # clip the gradient norm (None: no clipping)
    distill_method: str = "smc",  # "smc" | "is": the sampler of pi* for objective="distill" and ctl's positives
    distill_resample: bool = False,  # distill on a multinomial resample (True) or on weighted samples
    sampler_options: dict | None = None,  # options of distill_method, e.g. {"ess_threshold": 0.5}
    accelerator=None,  # an accelerate.Accelerator; default: one under `accelerate launch`, else none
) -> TrainRun:
    """Train ``policy`` towards ``post``'s pi* in place; see the module docstring.

    Parameters
    ----------
    post : Posterior
        The target pi* ∝ pi0 exp(r/beta); ``post.prior`` is pi0.
    policy : HFPolicy, TabularPolicy or TrainableTwist
        What is trained: a policy from :func:`posterior.train.policy_from` (over the same tokens as
        ``post.prior``), or a twist from ``pst.twists.learned(post.prior, ...)``.
    objective : str
        Policies: "reverse_kl" ("rl"), "forward_kl" ("dpg"), "js", "tv", "distill" or "reward".
        Twists: "ctl" (contrastive twist learning; positives from ``distill_method``), "regression"
        (exp-domain least squares on prior rollouts) or "fudge" (least squares to r: not psi*).
    steps : int
        Total optimiser steps (a resumed run counts the steps already done).
    batch_size : int
        Samples per prompt and step (>= 2 for on-policy objectives: leave-one-out baselines).
    lr : float
        Adam learning rate.
    max_new_tokens : int
        Continuation length, EOS counted (the support of pi*).
    prompts : list of str or None
        Prompts trained on together (None: one unconditional prompt).
    seed : int
        Seeds the one torch.Generator every draw uses.
    checkpoint_dir : path or None
        Checkpoints and metrics.jsonl; an existing run there is resumed.

    Returns
    -------
    TrainRun
    """
    if not isinstance(post, Posterior):
        raise ValueError(f"post must be a posterior.Posterior, got {type(post).__name__}")
    step_kind = get_step(policy, objective)  # what is trained x objective -> how a step draws and scores
    if step_kind.kind == "policy":
        check_proposal(post.prior, policy)
    _positive_int("steps", steps)
    _positive_int("batch_size", batch_size, step_kind.min_batch_size)
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("checkpoint_every", checkpoint_every)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
    if distill_method not in ("smc", "is"):
        raise ValueError(f"distill_method must be 'smc' or 'is', got {distill_method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    prompts = _check_prompts([prompts] if isinstance(prompts, str) else prompts)
    prior = post.prior
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    if step_kind.kind == "policy":
        q_ids = policy.encode_prompts(prompts)
        policy.check_lengths(q_ids, max_new_tokens, prompts)
    else:
        check_twist(post, policy, max_new_tokens)
        q_ids = prompt_ids
    P = len(prompt_ids)

    accelerator = accelerator if accelerator is not None else _auto_accelerator()
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    if accelerator is not None:
        if not hasattr(policy, "prepare"):
            raise ValueError(f"{type(policy).__name__} cannot train under accelerate (it has no prepare())")
        policy.prepare(accelerator)
    device = policy.trainable_parameters()[0].device
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=lr)
    if accelerator is not None:
        optimizer = accelerator.prepare_optimizer(optimizer)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if rank == 0 else derive_seed(seed, f"rank {rank}"))  # never overflows
    log_Z = torch.zeros(P, dtype=torch.float64)  # running log Ẑ per prompt (meaningless while count == 0)
    count = torch.zeros(P, dtype=torch.float64)  # samples behind it

    config = {
        "trains": step_kind.kind, "objective": step_kind.objective, "batch_size": batch_size, "lr": float(lr), "max_new_tokens": max_new_tokens,
        "prompts": prompts, "seed": seed, "beta": post.beta, "max_grad_norm": max_grad_norm, "world_size": world,
        "distill_method": distill_method, "distill_resample": distill_resample,
        "sampler_options": json.dumps(sampler_options or {}, sort_keys=True, default=str),
    }  # fmt: skip
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    mpath = Path(metrics_path) if metrics_path is not None else (directory / "metrics.jsonl" if directory else None)
    start, metrics = 0, []
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(directory, rank)
        found = ckpt.latest_step(directory, world)
        if found is not None:
            state = ckpt.load_checkpoint(directory, rank, found)
            _check_config(state, config, directory)
            if state["step"] > steps:
                raise ValueError(f"{directory} holds a checkpoint at step {state['step']}, beyond steps={steps}")
            policy.load_trainable_state(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            log_Z, count = state["log_Z"].clone(), state["count"].clone()
            start = state["step"]
    if mpath is not None and rank == 0:
        mpath.parent.mkdir(parents=True, exist_ok=True)
        metrics = ckpt.read_metrics(mpath, start)
        ckpt.rewrite_metrics(mpath, metrics)  # drop lines logged after the checkpoint we resume from

    def save(step):
        if directory is None:
            return
        payload = {
            "format": FORMAT, "step": step, "config": config, "trainable": policy.trainable_state(),
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "log_Z": log_Z, "count": count,
        }  # fmt: skip
        ckpt.save_checkpoint(directory, rank, step, payload)

    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=f"train {step_kind.objective}", unit="step", disable=not progress or rank != 0,
               file=sys.stderr, leave=False)  # fmt: skip
    mfile = open(mpath, "a") if (mpath is not None and rank == 0) else None  # noqa: SIM115 (closed in finally)
    try:
        for step in range(start, steps):
            ts = time.perf_counter()
            loss, row, log_Z, count = step_kind.run(StepInput(
                post, policy, prompts, prompt_ids, q_ids, batch_size, max_new_tokens, generator, log_Z, count,
                sampler=distill_method, resample=distill_resample, sampler_options=sampler_options or {},
            ))  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            if max_grad_norm is not None:
                params = policy.trainable_parameters()
                if accelerator is not None:
                    accelerator.clip_grad_norm_(params, max_grad_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            row = {"step": step + 1, "objective": step_kind.objective, **row, "seconds": time.perf_counter() - ts}
            metrics.append(row)
            if mfile is not None:
                mfile.write(json.dumps(row) + "\n")
                mfile.flush()
            bar.update(1)
            bar.set_postfix({k: row.get(k) for k in step_kind.progress_keys}, refresh=False)
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                save(step + 1)
    finally:
        bar.close()
        if mfile is not None:
            mfile.close()
    return TrainRun(
        objective=step_kind.objective, steps=steps, metrics=metrics, log_Z=log_Z, resumed_from=start if start else None,
        seconds=time.perf_counter() - t0, checkpoint_dir=directory, metrics_path=mpath, config=config,
    )  # fmt: skip


def _check_config(state: dict, config: dict, directory: Path) -> None:
    if state.get("format") != FORMAT:
        raise ValueError(f"{directory}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    old = state["config"]
    diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
    if diff:
        raise ValueError(
            f"{directory} holds a run with other settings, {diff} (checkpoint, now); use another checkpoint_dir "
            "or the same settings (only steps may change)"
        )


__all__ = ["TrainRun", "fit"]
