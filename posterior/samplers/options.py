"""The built-in methods' options as frozen dataclasses: one class per method, one field per option,
each field carrying its default, its check and a one-line help (TRL's one config per trainer).

    O = options_for("smc")                  # SMCOptions (posterior.samplers.options_for)
    O().ess_threshold                       # 0.5, the default
    O(ess_threshold=2.0)                    # ValueError: ess_threshold must be a finite number in [0, 1], got 2.0
    MHOptions(steps=8, burn_in=8)           # ValueError: burn_in must be < steps=8, got 8
    O.help()["ess_threshold"]               # the one-line help the command line prints

Everything else derives from these classes: the samplers receive an instance (checked once, on
construction), ``Posterior.sample`` builds it from its keywords, the command line's ``--option``
parsing and help read the fields, and the server reads the defaults (``sampler_options``). The
table views ``METHOD_OPTIONS`` / ``check_option`` / ``check_options`` are kept for code that reads
the options as data. This module imports no torch: a check is a function ``check(name, value) ->
value`` (the value as a plain Python type) that raises ``ValueError`` naming ``name`` and the value
(the checks of :mod:`posterior.validate`).

Options that take Python objects (a proposal prior, a callback, starting texts, a reference
trajectory) are marked ``python_object``: the library only. Their full checks need the objects'
classes and stay with the samplers; the fields check what they can without them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar

from posterior.validate import check_bool, check_choice, check_int, check_prob, check_real, is_int

Check = Callable[[str, Any], Any]

PROPOSALS = ("bootstrap", "tilted")  # SMC's proposals (posterior.samplers.smc_model)
MOVES = ("independence", "mixture", "suffix")  # MH's moves (posterior.samplers.mh)
SAMPLES = ("final", "all")  # what MH returns
RESAMPLING = ("multinomial", "residual", "stratified", "systematic")  # the built-in schemes (posterior.kernels.schemes)


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
# Fields and the base class
# --------------------------------------------------------------------------------------------------
def option(default, check: Check, help: str, *, python_object: bool = False, none_means: str | None = None):
    """A dataclass field for one option: its default, its check and its one-line help.
    ``python_object``: takes a Python object (a prior, a function, tensors), not a ``--option``;
    ``none_means``: what a None default stands for (shown in the command line's help)."""
    meta = {"check": check, "help": help, "python_object": python_object, "none_means": none_means}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One option of a method as data (the table view): its default, its check and its help."""

    default: Any
    check: Check  # check(name, value) -> value as a plain Python type; ValueError naming both
    python_object: bool = False  # takes a Python object (a prior, a function, tensors): not a --option
    help: str = ""
    none_means: str | None = None


@dataclass(frozen=True)
class Options:
    """Base of every method's options: each field is checked on construction (the value stored as
    the check returns it: a plain Python type), then :meth:`check_together` runs the checks that
    read several fields. Frozen: an instance is a checked set of options."""

    method: ClassVar[str] = ""  # the method's name (set by each built-in class)

    def __post_init__(self):
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))
        self.check_together()

    def check_together(self) -> None:
        """Checks over several fields (e.g. burn_in < steps); each raises ``ValueError``."""

    @classmethod
    def table(cls) -> dict[str, Option]:
        """{name: Option} in field order: the options as data."""
        out = {}
        for f in fields(cls):
            m = f.metadata
            out[f.name] = Option(None if f.default is MISSING else f.default, m.get("check") or python_object,
                                 bool(m.get("python_object")), m.get("help", ""), m.get("none_means"))  # fmt: skip
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    def as_kwargs(self) -> dict[str, Any]:
        """{name: value} (no copies: the values themselves, priors and tensors included)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> Options:
        return replace(self, **changes)


# Shared fields (a function per field: a dataclass field object belongs to one class).
def _proposal_prior():
    return option(None, python_object, "a Prior over the same tokens to draw from (None: the prior itself)",
                  python_object=True, none_means="the prior")  # fmt: skip


def _callback(what: str = "step"):
    return option(None, function, f"fn(StepReport) after every {what} (UIs, logs)", python_object=True, none_means="none")


def ess_threshold_field(per: str = "n"):
    return option(0.5, probability, f"resample a prompt when its ESS < ess_threshold · {per} (1: always, 0: never)")


def resampling_field():
    return option("systematic", resampling_scheme, "resampling scheme: multinomial | residual | stratified | systematic")


@dataclass(frozen=True)
class BatchingOptions(Options):
    """Draw-until-accepted methods: how many draws per round, and when to give up."""

    batch_size: int | None = option(None, optional(integer(1)), "draws per prompt per round", none_means="n")
    max_draws: int | None = option(None, optional(integer(1)), "draws per prompt before giving up with an error",
                                   none_means="1000·n")  # fmt: skip


@dataclass(frozen=True)
class SMCModelOptions(Options):
    """What SMC and particle Gibbs share: the resampling threshold and the model side (twist,
    proposal, blocks; ``posterior.samplers.smc_model``)."""

    ess_threshold: float = ess_threshold_field()
    twist: Any = option("auto", twist, '"auto" (the reward if it reads prefixes, else none) | None | Twist | Reward | fn(texts)')
    proposal: str = option("bootstrap", choice(*PROPOSALS), '"bootstrap" (the prior) | "tilted" (look-ahead; step-wise priors)')
    lookahead: int = option(8, integer(1), "candidate tokens per particle and step scored by the tilted proposal (non-dense twists)")
    block_size: int = option(1, integer(1), "tokens between reweighting / resampling (sequence-level priors: per block)")
    decode_ahead: bool | int = option(True, blocks_ahead, "sequence-level priors: True streamed or adaptive; k: k blocks ahead; False: one call per block")
    check_twist: bool = option(True, boolean, "roll out particles a twist kills: raise if a completion has a finite reward")


@dataclass(frozen=True)
class ChainOptions(Options):
    """What MCMC methods share (the chains loop, ``posterior.samplers.chains``): steps, burn-in, thinning."""

    steps: int = option(16, integer(1), "steps (sweeps) per chain")
    burn_in: int | None = option(None, optional(integer(0)), "steps discarded before the kept trace", none_means="steps // 2")
    thin: int = option(1, integer(1), "keep every thin-th state after burn-in, counted back from the last")

    def check_together(self) -> None:
        check_burn_in(self.steps, self.burn_in)

    @property
    def burn_in_steps(self) -> int:
        """The burn-in used: ``burn_in``, or ``steps // 2`` for None."""
        return check_burn_in(self.steps, self.burn_in)

    @property
    def kept(self) -> tuple[int, ...]:
        """The steps whose states are kept (step s: the state after s steps), every ``thin``-th
        after burn-in counted back from the last."""
        b = self.burn_in_steps
        return tuple(s for s in range(b + 1, self.steps + 1) if (self.steps - s) % self.thin == 0)


# --------------------------------------------------------------------------------------------------
# One class per method
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ISOptions(Options):
    method: ClassVar[str] = "is"
    proposal: Any = _proposal_prior()


@dataclass(frozen=True)
class BoNOptions(Options):
    method: ClassVar[str] = "bon"
    best_of: int = option(4, integer(1), "prior draws per output (k)")


@dataclass(frozen=True)
class SoftBoNOptions(BoNOptions):
    method: ClassVar[str] = "soft_bon"


@dataclass(frozen=True)
class RejectionOptions(BatchingOptions):
    method: ClassVar[str] = "rejection"
    reward_upper_bound: float | None = option(None, optional(number), "R >= r(x) for every x", none_means="the reward's upper_bound")


@dataclass(frozen=True)
class QRSOptions(BatchingOptions):
    method: ClassVar[str] = "qrs"
    log_bound: float | None = option(None, optional(number), "log B, the bound on the log-weights", none_means="largest pilot log-weight")
    proposal: Any = _proposal_prior()


@dataclass(frozen=True)
class SMCOptions(SMCModelOptions):
    method: ClassVar[str] = "smc"
    resampling: str = resampling_field()
    return_ancestry: bool = option(False, boolean, 'res.info["ancestry"] (P, n, steps)')
    callback: Any = _callback()
    reference: Any = option(None, python_object, "conditional SMC: (tokens (P, T), lengths (P,)) particle 0 of each prompt follows",
                            python_object=True)  # fmt: skip


@dataclass(frozen=True)
class MHOptions(ChainOptions):
    method: ClassVar[str] = "mh"
    move: str = option("suffix", choice(*MOVES), '"suffix" | "independence" | "mixture"')
    mixture_weight: float = option(0.5, probability, 'probability of an independence step under move="mixture"')
    init_texts: Any = option(None, python_object, "[P][n] starting texts", python_object=True, none_means="prior draws")
    callback: Any = _callback()
    return_chains: bool = option(False, boolean, 'res.info["chains"]: every state of every chain (MHChains)')
    samples: str = option("final", choice(*SAMPLES), '"final": the n final states; "all": every kept state (n · kept)')


@dataclass(frozen=True)
class PGibbsOptions(ChainOptions, SMCModelOptions):
    method: ClassVar[str] = "pgibbs"
    particles: int = option(16, movable_particles, "particles per conditional SMC sweep (>= 2: one particle never moves)")
    callback: Any = _callback("sweep")


#: The built-in methods' options, by name.
OPTIONS: dict[str, type[Options]] = {
    cls.method: cls
    for cls in (ISOptions, BoNOptions, SoftBoNOptions, RejectionOptions, QRSOptions, SMCOptions, MHOptions, PGibbsOptions)
}


# --------------------------------------------------------------------------------------------------
# Derived views (the table, as before)
# --------------------------------------------------------------------------------------------------
#: {method: {option: Option}} of the built-in methods: a view derived from ``OPTIONS``.
METHOD_OPTIONS: dict[str, dict[str, Option]] = {name: cls.table() for name, cls in OPTIONS.items()}


def check_option(method: str, name: str, value):
    """``value`` of option ``name`` of the built-in ``method``, checked (the field's check)."""
    return METHOD_OPTIONS[method][name].check(name, value)


def check_options(method: str, options: dict, *, cls: type[Options] | None = None) -> dict:
    """``options`` of ``method``, each checked, and the checks over several fields (burn-in <
    steps); returns the checked values. An unknown name raises ``ValueError`` listing the options."""
    cls = cls or OPTIONS[method]
    known = cls.table()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options are {sorted(known)}")
    checked = cls(**options)
    return {name: getattr(checked, name) for name in options}


__all__ = [
    "BatchingOptions", "BoNOptions", "ChainOptions", "ISOptions", "METHOD_OPTIONS", "MHOptions", "MOVES", "OPTIONS",
    "Option", "Options", "PGibbsOptions", "PROPOSALS", "QRSOptions", "RESAMPLING", "RejectionOptions", "SAMPLES",
    "SMCModelOptions", "SMCOptions", "SoftBoNOptions", "check_burn_in", "check_option", "check_options", "option",
]  # fmt: skip
