"""``FitConfig``: every setting of ``pst.train.fit`` once — its default, its check and its help.

    cfg = FitConfig(objective="dpg", steps=200, batch_size=8, lr=1e-3, max_new_tokens=16)
    run = pst.train.fit(post, policy, cfg)                      # or
    run = pst.train.fit(post, policy, objective="dpg", steps=200, batch_size=8, lr=1e-3, max_new_tokens=16)

The keywords of ``fit`` are this dataclass's fields (``fit(post, policy, **kw)`` builds
``FitConfig(**kw)``; with a config, keywords replace its fields). Constructing one checks every
field and raises ``ValueError`` naming the field and the bad value, before any model runs.
``posterior train`` takes its defaults and help from here (:func:`default`, :func:`help_of`) and
checks its arguments by building one; a resumed run compares the fields marked ``identity`` with
the checkpoint's (``TrainRun.config``), and ``allow_changes`` may name any of them.

No torch here: the command line checks its arguments before torch loads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posterior.train.objective_names import ALIASES, POLICY_OBJECTIVES, TWIST_OBJECTIVES, policy_objective
from posterior.validate import check_bool, check_choice, check_int, check_prompts, check_real, check_seed


def _setting(default=dataclasses.MISSING, *, help: str, identity: bool = False):
    """A field with its one-line help; ``identity``: part of a run's identity (checkpoint resume)."""
    if isinstance(default, (dict, list)):
        raise TypeError("mutable defaults: use None")
    return field(default=default, metadata={"help": help, "identity": identity})


@dataclass(frozen=True)
class FitConfig:
    """The settings of one training run (see the module docstring); frozen, checked on construction."""

    objective: str = _setting(
        help="policies: reverse_kl (rl), forward_kl (dpg), js, tv, distill, reward; twists: ctl, regression, fudge",
        identity=True,
    )
    max_new_tokens: int = _setting(help="continuation length, EOS counted (the support of pi*)", identity=True)
    steps: int = _setting(60, help="optimiser steps (a resumed run counts the steps already done)")
    batch_size: int = _setting(8, help="samples per prompt and step (>= 2 for on-policy objectives)", identity=True)
    lr: float = _setting(1e-3, help="Adam learning rate", identity=True)
    prompts: Sequence[str] | None = _setting(None, help="prompts trained on together (None: one unconditional prompt)",
                                             identity=True)  # fmt: skip
    seed: int = _setting(0, help="seeds the one torch.Generator every draw uses", identity=True)
    checkpoint_dir: str | os.PathLike | None = _setting(None, help="checkpoints + metrics.jsonl; resumes a run found there")
    checkpoint_every: int = _setting(10, help="steps between checkpoints (one is always written at the end)")
    metrics_path: str | os.PathLike | None = _setting(None, help="metrics file (default: CHECKPOINT_DIR/metrics.jsonl)")
    progress: bool = _setting(False, help="a tqdm bar on stderr")
    max_grad_norm: float | None = _setting(None, help="clip the gradient norm (None: no clipping)", identity=True)
    distill_method: str = _setting("smc", help="the sampler of pi* for distill and ctl's positives: smc | is",
                                   identity=True)  # fmt: skip
    distill_resample: bool = _setting(False, help="distill on a multinomial resample (True) or on weighted samples",
                                      identity=True)  # fmt: skip
    sampler_options: dict | None = _setting(None, help="options of distill_method, e.g. {'ess_threshold': 0.5}",
                                            identity=True)  # fmt: skip
    accelerator: Any = _setting(None, help="an accelerate.Accelerator (default: one under `accelerate launch`)")
    allow_changes: Sequence[str] = _setting((), help="identity fields a resumed run may change on purpose, e.g. ('lr',)")

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        if not isinstance(self.objective, str) or self.objective not in (*POLICY_OBJECTIVES, *ALIASES, *TWIST_OBJECTIVES):
            raise ValueError(
                f"unknown objective {self.objective!r}; choose one of "
                f"{sorted(POLICY_OBJECTIVES) + sorted(ALIASES) + sorted(TWIST_OBJECTIVES)}"
            )
        put("max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, 1))
        put("steps", check_int("steps", self.steps, 1))
        put("batch_size", check_int("batch_size", self.batch_size, min_batch_size(self.objective)))
        put("lr", check_real("lr", self.lr, positive=True))
        put("prompts", None if self.prompts is None else tuple(check_prompts(self.prompts)))
        put("seed", check_seed("seed", self.seed))
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise ValueError(f"checkpoint_dir must be a path or None, got {self.checkpoint_dir!r}")
        put("checkpoint_every", check_int("checkpoint_every", self.checkpoint_every, 1))
        if self.metrics_path is not None and not isinstance(self.metrics_path, (str, os.PathLike)):
            raise ValueError(f"metrics_path must be a path or None, got {self.metrics_path!r}")
        put("progress", check_bool("progress", self.progress))
        if self.max_grad_norm is not None:
            put("max_grad_norm", check_real("max_grad_norm", self.max_grad_norm, positive=True))
        put("distill_method", check_choice("distill_method", self.distill_method, ("smc", "is")))
        put("distill_resample", check_bool("distill_resample", self.distill_resample))
        if self.sampler_options is not None and not isinstance(self.sampler_options, dict):
            raise ValueError(f"sampler_options must be a dict of {self.distill_method!r}'s options, got {self.sampler_options!r}")
        put("sampler_options", dict(self.sampler_options or {}))
        put("allow_changes", _check_allow_changes(self.allow_changes))

    def identity(self) -> dict:
        """The fields that define the run (``identity``), as a checkpoint records them."""
        return {
            "objective": self.objective, "batch_size": self.batch_size, "lr": float(self.lr),
            "max_new_tokens": self.max_new_tokens, "prompts": None if self.prompts is None else list(self.prompts),
            "seed": self.seed, "max_grad_norm": self.max_grad_norm, "distill_method": self.distill_method,
            "distill_resample": self.distill_resample, "sampler_options": _json_options(self.sampler_options),
        }  # fmt: skip


#: Fields of a run's identity that ``fit`` adds to the config's own (what is trained, on what).
RUN_FIELDS = ("trains", "beta", "world_size", "prior", "reward", "policy")


def identity_fields() -> tuple[str, ...]:
    """Every field of ``TrainRun.config``: the config's identity fields, then ``RUN_FIELDS``."""
    return tuple(f.name for f in dataclasses.fields(FitConfig) if f.metadata["identity"]) + RUN_FIELDS


def default(name: str):
    """A field's default (the command line's default too)."""
    return FitConfig.__dataclass_fields__[name].default


def help_of(name: str) -> str:
    """A field's one-line help (the command line's help too)."""
    return FitConfig.__dataclass_fields__[name].metadata["help"]


def min_batch_size(objective: str) -> int:
    """2 for on-policy policy objectives (leave-one-out baselines), else 1."""
    if objective in TWIST_OBJECTIVES:
        return 1
    return 2 if POLICY_OBJECTIVES[policy_objective(objective)].on_policy else 1


def _json_options(options: dict) -> str:
    import json

    return json.dumps(options, sort_keys=True, default=str)


def _check_allow_changes(allow_changes) -> tuple[str, ...]:
    if isinstance(allow_changes, str):
        allow_changes = (allow_changes,)
    try:
        names = tuple(allow_changes)
    except TypeError:
        raise ValueError(f"allow_changes must be a sequence of config field names, got {allow_changes!r}") from None
    known = set(identity_fields()) | {"steps"}
    bad = [n for n in names if not isinstance(n, str) or n.split(".")[0] not in known]
    if bad:
        raise ValueError(f"allow_changes names unknown field(s) {bad}; choose from {sorted(known)}")
    return names


__all__ = ["FitConfig", "RUN_FIELDS", "default", "help_of", "identity_fields", "min_batch_size"]
