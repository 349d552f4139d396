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
+ log Ẑ), ``ess`` (of the weights pi*/q, in [1, N]), ``log_Z`` (running), ``log_Z_batch``, ``loss``; each row's ``estimates`` names the fields
that are estimates (a KL estimate from one batch can be negative).
Twist steps log ``loss``, ``residual`` (the objective's mean per-position signal), ``ess`` and
``log_Z_batch`` of the sample of pi* they saw (SMC or IS), ``ess_negatives`` (ctl: mean over t of
the negatives' ESS), ``reward_mean`` (ctl: weighted E_pi*[r]; regression, fudge: E_pi0[r]).

Resume. With ``checkpoint_dir``, a checkpoint holds the trainable weights (LoRA adapter, full
weights or logit table), the optimiser state, the torch.Generator state, the step and the running
log Z. Calling ``fit`` again with the same directory continues from the latest checkpoint and, on
the CPU, ends bit-for-bit where an uninterrupted run ends (the same draws, in the same order).

A checkpoint belongs to one run: it records what defines it (``TrainRun.config``: the prior's and
the reward's names and content fingerprints, see :mod:`posterior.train.checkpoint`; beta, prompts,
objective, the policy's kind and trainable shapes, batch_size, lr, max_new_tokens, seed and the
other settings), and resuming with anything different is refused with one message naming each
field (checkpoint -> now). ``allow_changes=("lr", ...)`` accepts a deliberate change of the named
fields. ``steps`` is not part of the identity: it may grow (or shrink to no fewer than the steps
already done) freely. A damaged latest checkpoint (truncated, emptied, foreign) is skipped for the
previous good one with a warning; with none left, a :class:`~posterior.errors.CheckpointError`
names the files.

Scale. Under ``accelerate launch`` (WORLD_SIZE > 1) the loop builds an ``accelerate.Accelerator``
itself (or takes ``accelerator=``): the policy is placed on its device, the optimiser is prepared,
an HF policy's training forward goes through DDP so gradients are averaged across processes, and
each rank draws its own batch (rank 0 from ``seed``, rank k from ``derive_seed(seed, "rank k")``);
rank 0 writes metrics, every rank writes its own checkpoint file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posterior.errors import CheckpointError
from posterior.posterior import Posterior
from posterior.samplers.common import check_proposal
from posterior.seeds import derive_seed
from posterior.train import checkpoint as ckpt
from posterior.train.config import FitConfig, identity_fields
from posterior.train.steps import StepInput, check_twist, get_step
from posterior.validate import check_int

FORMAT = 1  # checkpoint payload version
# Metrics that are Monte Carlo estimates from the step's batch (a KL estimate can come out negative,
# e.g. KL(pi*||q) by self-normalised IS with a noisy running log Z): each row names them.
ESTIMATED = ("reward_mean", "kl_prior", "kl_target_forward", "kl_target_reverse", "ess", "log_Z", "log_Z_batch",
             "pseudo_reward_mean", "ess_negatives", "residual")  # fmt: skip


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




def _auto_accelerator():
    """An Accelerator when launched as several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        # without cpu=True accelerate ignores a multi-process CPU launch (torchrun) and runs each rank alone
        return Accelerator(cpu=not torch.cuda.is_available())
    return None


def fit(post: Posterior, policy, config: FitConfig | None = None, **settings) -> TrainRun:
    """Train ``policy`` towards ``post``'s pi* in place; see the module docstring.

    Parameters
    ----------
    post : Posterior
        The target pi* ∝ pi0 exp(r/beta); ``post.prior`` is pi0.
    policy : HFPolicy, TabularPolicy or TrainableTwist
        What is trained: a policy from :func:`posterior.train.policy_from` (over the same tokens as
        ``post.prior``), or a twist from ``pst.twists.learned(post.prior, ...)``.
    config : FitConfig, optional
        The run's settings (:class:`posterior.train.config.FitConfig`: objective, steps,
        batch_size, lr, max_new_tokens, prompts, seed, checkpoint_dir, allow_changes, ...).
    **settings
        FitConfig's fields as keywords: ``fit(post, policy, objective="dpg", steps=200, ...)``
        builds ``FitConfig(**settings)``; with ``config`` too, they replace its fields.

    Returns
    -------
    TrainRun
    """
    if not isinstance(post, Posterior):
        raise ValueError(f"post must be a posterior.Posterior, got {type(post).__name__}")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(FitConfig)})
    if unknown:
        raise TypeError(f"fit() got unknown setting(s) {unknown}; its settings are FitConfig's fields: "
                        f"{[f.name for f in dataclasses.fields(FitConfig)]}")  # fmt: skip
    if config is None:
        config = FitConfig(**settings)
    elif not isinstance(config, FitConfig):
        raise ValueError(f"config must be a posterior.train.FitConfig, got {type(config).__name__}: {config!r:.80}")
    elif settings:
        config = dataclasses.replace(config, **settings)
    cfg = config
    step_kind = get_step(policy, cfg.objective)  # what is trained x objective -> how a step draws and scores
    if step_kind.kind == "policy":
        check_proposal(post.prior, policy)
    check_int("batch_size", cfg.batch_size, step_kind.min_batch_size)  # the step's own need (FitConfig checks the objective's)
    steps, batch_size, max_new_tokens, lr = cfg.steps, cfg.batch_size, cfg.max_new_tokens, cfg.lr
    checkpoint_dir, metrics_path, max_grad_norm, seed = cfg.checkpoint_dir, cfg.metrics_path, cfg.max_grad_norm, cfg.seed
    prompts = None if cfg.prompts is None else list(cfg.prompts)
    if checkpoint_dir is not None:
        ckpt.check_directory(Path(checkpoint_dir))
    if metrics_path is not None and Path(metrics_path).is_dir():
        raise CheckpointError(f"metrics_path {metrics_path} is a folder; give a file path (e.g. .../metrics.jsonl)", metrics_path)
    prior = post.prior
    prompt_ids = prior.encode_prompts(prompts)
    prior.check_lengths(prompt_ids, max_new_tokens, prompts)
    if step_kind.kind == "policy":
        q_ids = policy.encode_prompts(prompts)
        policy.check_lengths(q_ids, max_new_tokens, prompts)
    else:
        check_twist(post, policy, max_new_tokens, resample=cfg.distill_resample)
        q_ids = prompt_ids
    P = len(prompt_ids)

    accelerator = cfg.accelerator if cfg.accelerator is not None else _auto_accelerator()
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

    # What the run is (checked on resume): the config's identity fields, and what fit adds (RUN_FIELDS).
    config = {"trains": step_kind.kind, **cfg.identity(), "objective": step_kind.objective, "beta": post.beta, "world_size": world}
    if checkpoint_dir is not None:  # what the run is, by content (cheap: see posterior.train.checkpoint)
        config.update(prior=ckpt.prior_fingerprint(prior), reward=ckpt.reward_fingerprint(post.reward, prior, prompts),
                      policy=ckpt.policy_fingerprint(policy))  # fmt: skip
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    mpath = Path(metrics_path) if metrics_path is not None else (directory / "metrics.jsonl" if directory else None)
    start, metrics = 0, []
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(directory, rank)
        state = _load_latest(directory, rank, world)
        if state is not None:
            _check_config(state, config, directory, cfg.allow_changes)
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
    bar = tqdm(total=steps, initial=start, desc=f"train {step_kind.objective}", unit="step", disable=not cfg.progress or rank != 0,
               file=sys.stderr, leave=False)  # fmt: skip
    mfile = open(mpath, "a") if (mpath is not None and rank == 0) else None  # noqa: SIM115 (closed in finally)
    try:
        for step in range(start, steps):
            ts = time.perf_counter()
            loss, row, log_Z, count = step_kind.run(StepInput(
                post, policy, prompts, prompt_ids, q_ids, batch_size, max_new_tokens, generator, log_Z, count,
                sampler=cfg.distill_method, step=step + 1, resample=cfg.distill_resample, sampler_options=cfg.sampler_options,
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
            row["estimates"] = [k for k in ESTIMATED if row.get(k) is not None]  # from the step's batch, not exact
            metrics.append(row)
            if mfile is not None:
                mfile.write(json.dumps(row) + "\n")
                mfile.flush()
            bar.update(1)
            bar.set_postfix({k: row.get(k) for k in step_kind.progress_keys}, refresh=False)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                save(step + 1)
    finally:
        bar.close()
        if mfile is not None:
            mfile.close()
    if step_kind.kind == "policy" and not bool(torch.isfinite(log_Z).all()):  # DPG: no positive weight in any step
        p = int((~torch.isfinite(log_Z)).nonzero()[0])
        raise ValueError(
            f"{step_kind.objective}: by step {steps} no sample of prompt {p} has had positive posterior weight (every reward -inf), "
            "so nothing was trained; increase batch_size or steps, or relax the constraint"
        )
    return TrainRun(
        objective=step_kind.objective, steps=steps, metrics=metrics, log_Z=log_Z, resumed_from=start if start else None,
        seconds=time.perf_counter() - t0, checkpoint_dir=directory, metrics_path=mpath, config=config,
    )  # fmt: skip


def _load_latest(directory: Path, rank: int, world: int) -> dict | None:
    """The latest checkpoint every rank has that loads; a damaged later one is skipped with a
    warning. None when there is none; CheckpointError when every one is damaged."""
    found = ckpt.steps_of(directory)
    common = set.intersection(*(set(found.get(r, [])) for r in range(world))) if found else set()
    errors = []
    for step in sorted(common, reverse=True):
        try:
            state = ckpt.load_checkpoint(directory, rank, step)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            warnings.warn(f"{'; '.join(errors)}: resuming from the previous checkpoint, step {step}", stacklevel=3)
        return state
    if errors:
        raise CheckpointError(f"no usable checkpoint in {directory}: {'; '.join(errors)}", directory)
    return None


# The fields of a run's identity (``TrainRun.config``); nested ones (prior, reward, policy) are
# compared field by field ("reward.fingerprint"). FitConfig marks its own; fit adds RUN_FIELDS.
CONFIG_FIELDS = identity_fields()


def _flat(config: dict) -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


_MISSING = "<not recorded>"


def _check_config(state: dict, config: dict, directory: Path, allow_changes: Sequence[str] = ()) -> None:
    """Refuse to resume a checkpoint of another run: one message naming every field that differs."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: checkpoint format {state.get('format')!r}, expected {FORMAT}", directory)
    old, new = _flat(state["config"]), _flat(config)
    allowed = lambda k: k in allow_changes or k.split(".")[0] in allow_changes  # noqa: E731
    diff = [(k, old.get(k, _MISSING), v) for k, v in new.items() if old.get(k, _MISSING) != v and not allowed(k)]
    if diff:
        fields = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff)
        names = tuple(dict.fromkeys(k.split(".")[0] for k, _, _ in diff))
        raise ValueError(
            f"{directory} holds a checkpoint of a run with other settings (checkpoint -> now): {fields}. Use another "
            f"checkpoint_dir, the same settings, or fit(..., allow_changes={names!r}) to change them on purpose "
            "(steps may always change)"
        )


__all__ = ["FitConfig", "TrainRun", "fit"]
