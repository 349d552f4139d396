"""Learned twists: ``pst.twists.learned(prior, ...)`` picks a trainable twist by the prior's
capabilities; ``pst.twists.load(path, prior)`` reads a saved one back.

Kinds are registered in :data:`KINDS` (:mod:`posterior.twists.kinds`; first match in registration
order wins, unless ``kind=`` names one):

* ``"head"`` (priors with the ``HIDDEN_STATES`` capability: ``HFPrior``): a small head over the
  frozen prior's hidden states, registered by its own module;
* ``"tabular"`` (priors without hidden states whose (prompt, prefix, token) table is small: a
  ``CallablePrior``): :class:`posterior.twists.tabular.TabularTwist`, whose optimum is exact.

Adding a kind (one file): write a :class:`~posterior.twists.base.TrainableTwist` subclass with a
class attribute ``kind``, a ``config()`` dict (``"kind"`` included) written by its ``save`` into
``twist.json`` next to its weights, and a classmethod ``load(path, prior, config)``; then call
``register(TwistKind(name, applies, build, load))`` at import and import the module at the end of
this one (so the kind is registered whenever ``learned`` / ``load`` can be called). ``pst.train.fit(post, twist, objective=...)`` trains any
``TrainableTwist`` through its ``prefix_values(..., grad=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from posterior.priors.base import HIDDEN_STATES, Prior
from posterior.priors.prefix_index import MAX_TABLE_ENTRIES, table_size
from posterior.twists.base import TrainableTwist
from posterior.twists.kinds import KINDS, TwistKind, register
from posterior.twists.tabular import CONFIG_FILE, TabularTwist, prior_fingerprint


def _tabular_applies(prior, max_new_tokens, prompts) -> bool:
    if prior.has(HIDDEN_STATES) or max_new_tokens is None:
        return False
    n = 1 if prompts is None else len(set(map(str, prompts)))
    return table_size(prior, max_new_tokens, n) <= MAX_TABLE_ENTRIES


def _build_tabular(prior, *, max_new_tokens, prompts):
    if max_new_tokens is None:
        raise ValueError("a tabular twist needs max_new_tokens, the depth of its table")
    return TabularTwist(prior, max_new_tokens, prompts=prompts)


register(TwistKind(
    "tabular", _tabular_applies, _build_tabular, TabularTwist.load,
    requires=f"no {HIDDEN_STATES!r} capability, max_new_tokens given, and a (prompt, prefix, token) table of <= "
             f"{MAX_TABLE_ENTRIES} entries (a CallablePrior with a small vocabulary)",
))  # fmt: skip


def learned(prior: Prior, *, max_new_tokens: int | None = None, prompts: Sequence[str] | None = None, kind: str | None = None, **options) -> TrainableTwist:
    """A trainable twist for ``prior``, chosen by its capabilities (see the module docstring).

    Parameters
    ----------
    prior : Prior
        pi0 (the twist reads its token ids, and its hidden states where it has them).
    max_new_tokens : int or None
        The continuation length the twist is for (required by the tabular kind: its depth).
    prompts : list of str or None
        Tabular kind: the prompts the table covers (None: one unconditional prompt).
    kind : str or None
        A registered kind by name (``sorted(KINDS)``); None: the first that applies.
    **options
        Passed to the kind's constructor, which names any it does not take.

    Returns
    -------
    TrainableTwist
    """
    if not isinstance(prior, Prior):
        raise ValueError(f"prior must be a posterior prior, got {type(prior).__name__}")
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of str or None, got the str {prompts!r}")
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown twist kind {kind!r}; registered: {sorted(KINDS)}")
        chosen = KINDS[kind]
    else:
        found = [k for k in KINDS.values() if k.applies(prior, max_new_tokens, prompts)]
        if not found:
            needs = "; ".join(f"{k.name!r}: {k.requires or 'see its module'}" for k in KINDS.values())
            raise ValueError(
                f"no learned twist applies to {type(prior).__name__} (capabilities {sorted(prior.capabilities)}, "
                f"max_new_tokens={max_new_tokens!r}); kinds need — {needs}"
            )
        chosen = found[0]
    try:
        return chosen.build(prior, max_new_tokens=max_new_tokens, prompts=prompts, **options)
    except TypeError as e:  # an option the kind does not take
        if options and "unexpected keyword argument" in str(e):
            raise ValueError(f"twist kind {chosen.name!r} does not take {e}".replace("() got an ", "(): ")) from e
        raise


def load(path: str | os.PathLike, prior: Prior) -> TrainableTwist:
    """A twist saved by ``twist.save(path)``, over ``prior`` (the prior it was trained for).

    A missing, damaged or foreign folder, and weights that are not finite (NaN, +inf; -inf only
    where a table allows it), raise :class:`~posterior.errors.CheckpointError` naming the folder."""
    from safetensors import SafetensorError

    from posterior.errors import CheckpointError
    from posterior.errors import first_line
    from posterior.validate import check_finite

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"twist folder {path} does not exist", path)
    if not path.is_dir():
        raise CheckpointError(f"twist folder {path} is a file, not a folder saved by twist.save", path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} holds no saved twist (no {CONFIG_FILE})", path)
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"twist folder {path}: {CONFIG_FILE} is damaged (not JSON: {first_line(e)})", path) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"twist folder {path}: {CONFIG_FILE} holds a {type(config).__name__}, not a twist's config", path)
    name = config.get("kind")
    if name not in KINDS:
        raise ValueError(f"{path}: twist kind {name!r} is not registered (known: {sorted(KINDS)})")
    saved, now = config.get("prior"), prior_fingerprint(prior)
    if saved is not None and saved != now:
        if not isinstance(saved, dict):
            raise CheckpointError(f"twist folder {path}: {CONFIG_FILE} records the prior as {saved!r}, not a fingerprint", path)
        diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
        raise ValueError(f"{path} holds a {name} twist for another prior: {diff} (saved, given)")
    try:
        twist = KINDS[name].load(path, prior, config)
    except CheckpointError:
        raise
    except (KeyError, TypeError, OSError, SafetensorError, RuntimeError) as e:  # torn weights, a config missing fields
        raise CheckpointError(f"twist folder {path} cannot be loaded: it is damaged ({type(e).__name__}: {first_line(e)})", path) from None
    check_finite(twist.trainable_state(), f"{name} twist folder", path, allow_neg_inf=name == "tabular")  # psi = -inf: never
    return twist


import posterior.twists.head  # noqa: E402, F401  (registers the "head" kind)

__all__ = ["KINDS", "TwistKind", "learned", "load", "register"]
