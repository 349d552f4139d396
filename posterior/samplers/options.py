"""The built-in samplers' options as data: for each method, each option's default and its check.

One table, used twice: the command line checks ``--option KEY=VALUE`` against it before a model
(or torch) loads, and the samplers run the same checks on the values they are given, so both refuse
the same values with the same message. This module imports no torch; a check is a function
``check(name, value) -> value`` (the value as a plain Python type) that raises ``ValueError``
naming ``name`` and the value (the checks of :mod:`posterior.validate`).

    METHOD_OPTIONS["smc"]["ess_threshold"]                # Option(default=0.5, check=probability)
    check_option("smc", "ess_threshold", 2)               # ValueError: ess_threshold must be a finite number in [0, 1], got 2
    check_options("mh", {"steps": 8, "burn_in": 8})       # ValueError: burn_in must be < steps=8, got 8

Options that take Python objects (a proposal prior, a callback, starting texts, a reference
trajectory) are marked ``python_object``: the library only. Their full checks need the objects'
classes and stay with the samplers; the table checks what it can without them. The defaults equal
the samplers' signatures (``registry.sampler_options``; a test holds them equal).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posterior.validate import check_bool, check_choice, check_int, check_prob, check_real, is_int

Check = Callable[[str, Any], Any]

PROPOSALS = ("bootstrap", "tilted")  # SMC's proposals (posterior.samplers.smc_model)
MOVES = ("independence", "mixture", "suffix")  # MH's moves (posterior.samplers.mh)
SAMPLES = ("final", "all")  # what MH returns
RESAMPLING = ("multinomial", "residual", "stratified", "systematic")  # the built-in schemes (posterior.kernels.schemes)


@dataclass(frozen=True)
class Option:
    """One option of a method: its default and its check."""

    default: Any
    check: Check  # check(name, value) -> value as a plain Python type; ValueError naming both
    python_object: bool = False  # takes a Python object (a prior, a function, tensors): not a --option


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def integer(minimum: int) -> Check:
    """An int >= ``minimum``."""

    def check(name, value):
        return check_int(name, value, minimum)

    return check


def optional(check: Check) -> Check:
    """None, or a value ``check`` accepts."""

    def check_or_none(name, value):
        return None if value is None else check(name, value)

    return check_or_none


def choice(*choices: str) -> Check:
    """One of ``choices``."""

    def check(name, value):
        return check_choice(name, value, choices)

    return check


def number(name, value) -> float:
    return check_real(name, value)


def probability(name, value) -> float:
    return check_prob(name, value)


def boolean(name, value) -> bool:
    return check_bool(name, value)


def resampling_scheme(name, value) -> str:
    """A registered resampling scheme. Schemes a user registers live in
    ``posterior.kernels.schemes.RESAMPLERS``, which is loaded (with torch) before anyone can
    register one; until then the registered schemes are the built-in ones."""
    schemes = sys.modules.get("posterior.kernels.schemes")
    return check_choice(name, value, sorted(schemes.RESAMPLERS) if schemes is not None else RESAMPLING)


def blocks_ahead(name, value) -> bool | int:
    """A bool, or a positive int (blocks drawn ahead)."""
    if not isinstance(value, bool) and not (is_int(value) and int(value) >= 1):
        raise ValueError(f"{name} must be a bool or a positive int (blocks drawn ahead), got {value!r}")
    return value


def twist(name, value):
    """"auto", None, or an object (a Twist, a Reward, a function of texts) that the sampler resolves;
    any other string, number or bool is refused here."""
    if isinstance(value, (str, int, float)) and value != "auto":  # bool is an int
        raise ValueError(f'{name} must be "auto", None, a Twist, a Reward or a function of texts, got {value!r}')
    return value


def function(name, value):
    """None or a callable."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be callable, got {value!r}")
    return value


def python_object(name, value):
    """Checked by the sampler, which knows the classes (e.g. ``check_proposal``)."""
    return value


def movable_particles(name, value) -> int:
    """Particles of a particle Gibbs sweep: >= 2, since with one (the reference) a chain never moves."""
    value = check_int(name, value, 1)
    if value < 2:
        raise ValueError(
            f"{name} must be >= 2 for particle Gibbs, got {value!r}: a sweep with one particle keeps its reference, "
            "so every chain would stay at its first state (a draw of the first sweep, not of pi*)"
        )
    return value


def check_burn_in(steps: int, burn_in: int | None) -> int:
    """MCMC burn-in: None means ``steps // 2``; it must leave a step to keep (< steps)."""
    burn_in = steps // 2 if burn_in is None else burn_in
    if burn_in >= steps:
        raise ValueError(f"burn_in must be < steps={steps}, got {burn_in!r}")
    return burn_in


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
_BATCHING = {
    "batch_size": Option(None, optional(integer(1))),  # draws per prompt per round (None: n)
    "max_draws": Option(None, optional(integer(1))),  # per prompt, before giving up (None: 1000·n)
}
_SMC_MODEL = {  # what SMC and particle Gibbs share (the model side and the engine)
    "ess_threshold": Option(0.5, probability),
    "twist": Option("auto", twist),
    "proposal": Option("bootstrap", choice(*PROPOSALS)),
    "lookahead": Option(8, integer(1)),
    "block_size": Option(1, integer(1)),
    "decode_ahead": Option(True, blocks_ahead),
    "check_twist": Option(True, boolean),
}
_CALLBACK = Option(None, function, python_object=True)
_PROPOSAL_PRIOR = Option(None, python_object, python_object=True)  # a Prior over the same tokens (None: the prior)

METHOD_OPTIONS: dict[str, dict[str, Option]] = {
    "is": {"proposal": _PROPOSAL_PRIOR},
    "bon": {"best_of": Option(4, integer(1))},
    "soft_bon": {"best_of": Option(4, integer(1))},
    "rejection": {"reward_upper_bound": Option(None, optional(number)), **_BATCHING},  # None: the reward's upper_bound
    "qrs": {"log_bound": Option(None, optional(number)), "proposal": _PROPOSAL_PRIOR, **_BATCHING},
    "smc": {
        "ess_threshold": _SMC_MODEL["ess_threshold"],
        "resampling": Option("systematic", resampling_scheme),
        **{k: v for k, v in _SMC_MODEL.items() if k != "ess_threshold"},
        "return_ancestry": Option(False, boolean),
        "callback": _CALLBACK,
        "reference": Option(None, python_object, python_object=True),  # conditional SMC: (tokens, lengths)
    },
    "mh": {
        "move": Option("suffix", choice(*MOVES)),
        "mixture_weight": Option(0.5, probability),
        "steps": Option(16, integer(1)),
        "burn_in": Option(None, optional(integer(0))),  # None: steps // 2
        "thin": Option(1, integer(1)),
        "init_texts": Option(None, python_object, python_object=True),  # [P][n] texts (None: prior draws)
        "callback": _CALLBACK,
        "return_chains": Option(False, boolean),
        "samples": Option("final", choice(*SAMPLES)),
    },
    "pgibbs": {
        "particles": Option(16, movable_particles),  # >= 2: one particle never moves
        "steps": Option(16, integer(1)),
        "burn_in": Option(None, optional(integer(0))),  # None: steps // 2
        **_SMC_MODEL,
        "callback": _CALLBACK,
    },
}


def check_option(method: str, name: str, value):
    """``value`` of option ``name`` of the built-in ``method``, checked (the table's check)."""
    return METHOD_OPTIONS[method][name].check(name, value)


def check_options(method: str, options: dict) -> dict:
    """``options`` of the built-in ``method``, each checked, and burn-in < steps where the method
    has both; returns the checked values. An unknown name raises ``ValueError`` listing the options."""
    known = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(known)}")
    out = {name: check_option(method, name, value) for name, value in options.items()}
    if "burn_in" in known and ("burn_in" in out or "steps" in out):
        check_burn_in(out.get("steps", known["steps"].default), out.get("burn_in", known["burn_in"].default))
    return out


__all__ = [
    "METHOD_OPTIONS", "MOVES", "Option", "PROPOSALS", "RESAMPLING", "SAMPLES", "check_burn_in", "check_option",
    "check_options",
]  # fmt: skip
