"""The result every sampler returns, with its diagnostics.

For weighted samples (x_i, w̄_i) of pi*(x) ∝ pi0(x) exp(r(x)/beta):

    E_pi*[r]          ≈ sum_i w̄_i r(x_i)
    ESS               = 1 / sum_i w̄_i^2           (importance-sampling ESS, not MCMC's)
    KL(pi* || pi0)    = E_pi*[r]/beta - log Z      (since log pi*/pi0 = r/beta - log Z)

log Z is each method's own estimate (None where the method has none, e.g. best-of-n).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch


@dataclass(frozen=True, eq=False)
class Info(Mapping):
    """A method's diagnostics: a typed, frozen record that still reads like a mapping.

    Each method has its subclass (``SMCInfo``, ``MHInfo``, ...; blackjax's typed infos): read its
    fields (``res.info.r_hat``) or, as before, its keys (``res.info["r_hat"]``, ``.keys()``,
    ``in``, ``.get``). The keys are the fields that are set (not None), plus those a method always
    reports (``always_keys``, e.g. MH's ``r_hat``, None with a ``r_hat_note`` when undefined), plus
    the entries of ``extra``: what a hand-built result passes as a plain dict, kept as it is and
    readable as attributes too. Frozen: change one with :meth:`replace` (a new info).
    """

    ess: Any = None  # (P,) importance-sampling ESS of the result's weights (the same tensor as res.ess)
    degenerate: Any = None  # (P,) bool: prompts whose samples all have weight 0 (log Z^ = -inf, see e.result)
    runs: str | None = None  # how the prompts were run (one run per prompt for a reward that reads prompts)
    extra: Mapping = field(default_factory=dict)  # entries without a field (hand-built results, user samplers)

    always_keys: ClassVar[tuple[str, ...]] = ()
    _tail: ClassVar[tuple[str, ...]] = ("ess", "degenerate", "runs")

    @classmethod
    def of(cls, mapping: Mapping | None = None, **entries) -> "Info":
        """An info of this class from a mapping: entries named like fields fill them, the rest go to ``extra``."""
        if isinstance(mapping, Info):
            mapping = dict(mapping)
        items = {**dict(mapping or {}), **entries}
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in items.items() if k in names}, extra={k: v for k, v in items.items() if k not in names})

    def replace(self, **changes) -> "Info":
        """A copy with ``changes`` (names without a field go to ``extra``)."""
        names = {f.name for f in fields(self)} - {"extra"}
        extra = {**self.extra, **{k: v for k, v in changes.items() if k not in names}}
        return replace(self, **{k: v for k, v in changes.items() if k in names}, extra=extra)

    def __getattr__(self, name):  # only called when no field or attribute has the name: the extras
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def _keys(self) -> list[str]:
        names = [f.name for f in fields(self) if f.name != "extra"]
        order = [k for k in names if k not in self._tail] + [k for k in names if k in self._tail]
        keys = [k for k in order if getattr(self, k) is not None or k in self.always_keys]
        return keys + [k for k in self.extra if k not in keys]

    def __getitem__(self, key):
        if key in self.extra:
            return self.extra[key]
        if key in self._keys():
            return getattr(self, key)
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        return key in self._keys()

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __repr__(self):
        inner = ", ".join(f"{k}={_short(v)}" for k, v in self.items())
        return f"{type(self).__name__}({inner})"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.__repr__ = Info.__repr__  # set before @dataclass runs, so it keeps this short one (the keys, tensors by shape)


def _short(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"<tensor {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}>"
    return repr(v)


@dataclass
class SampleResult:
    method: str
    beta: float
    prompts: list[str] | None  # None: one unconditional prompt
    texts: list[list[str]]  # [P][N] continuations (prompt excluded)
    tokens: torch.Tensor  # (P, N, T) continuation token ids, EOS-padded after each length
    lengths: torch.Tensor  # (P, N) tokens per continuation, EOS included
    log_weights: torch.Tensor  # (P, N) normalised: logsumexp over N == 0
    rewards: torch.Tensor  # (P, N)
    log_prior: torch.Tensor  # (P, N) log pi0(x | prompt)
    log_Z: torch.Tensor | None  # (P,) estimate of log sum_x pi0(x) exp(r(x)/beta)
    ess: torch.Tensor  # (P,) importance-sampling effective sample size
    targets_posterior: bool = True  # False for best-of-n style methods: samples are not from pi*
    info: Info = field(default_factory=Info)  # the method's typed diagnostics (a dict is turned into an Info)
    prior: dict = field(default_factory=dict)  # how the prior was defined (temperature, top-k, ...)
    seconds: float = float("nan")
    kl_prior: torch.Tensor | None = None  # (P,) float64 KL(pi*||pi0) estimate, from unnormalised log-weights
    seed: int | list[int] | None = None  # the seed the run used (drawn fresh for seed=None), or the per-prompt seeds; None with a generator

    def __post_init__(self):
        if not isinstance(self.info, Info):
            self.info = Info.of(self.info)

    @property
    def num_prompts(self) -> int:
        return self.log_weights.shape[0]

    def check_samples(self, what: str = "samples") -> None:
        """Raise :class:`~posterior.errors.DegenerateWeightsError` where a prompt has no sample of
        positive weight (``info["degenerate"]``: an SMC run whose particles all died has Ẑ = 0 there,
        an honest log Z = -inf, but nothing to average)."""
        dead = self.info.degenerate
        if isinstance(dead, torch.Tensor) and bool(dead.any()):
            from posterior.errors import DegenerateWeightsError

            rows = dead.nonzero().flatten().tolist()
            names = ", ".join("<unconditional>" if self.prompts is None else repr(self.prompts[p][:80]) for p in rows)
            raise DegenerateWeightsError(
                f"{what}: every sample of prompt(s) {names} has weight 0 in this {self.method} run (log Z = -inf, "
                "Z^ = 0): there is nothing to average",
                rows=rows,
            )

    def reward_mean(self) -> torch.Tensor:
        """(P,) weighted mean reward: the estimate of E_pi*[r] for methods that target pi*.
        Samples with reward -inf carry weight 0 in every method that targets pi*."""
        self.check_samples("reward_mean")
        w = self.log_weights.double().exp()
        r = torch.where(w > 0, self.rewards.double(), 0.0)
        return (w * r).sum(-1)

    def kl(self) -> torch.Tensor | None:
        """(P,) float64 estimate of KL(pi* || pi0) = E_pi*[r]/beta - log Z, or None without log Z.

        The sampler computes it from reward differences and unnormalised log-weights in float64
        (``kl_prior``), so it stays exact when r/beta is large; a result built by hand without
        ``kl_prior`` gets the same formula from its float64 log Z, shifted by the largest reward."""
        if self.log_Z is None or not self.targets_posterior:
            return None
        self.check_samples("KL(pi*||pi0)")
        if self.kl_prior is not None:
            return self.kl_prior
        from posterior.diagnostics.tilt import kl_estimate, reward_shift

        shift = reward_shift(self.rewards)
        return kl_estimate(self.log_weights, self.rewards, self.beta, shift, self.log_Z.double() - shift / self.beta)

    def distinct(self) -> list[int]:
        """Distinct token sequences among each prompt's samples (resampling and MCMC repeat some)."""
        from posterior.exact import sequence_keys

        return [len(set(row)) for row in sequence_keys(self.tokens, self.lengths)]

    def summary(self) -> dict:
        """Per-prompt diagnostics as plain Python numbers (lists over prompts)."""
        kl = self.kl()
        out = {
            "method": self.method,
            "beta": self.beta,
            "n": self.log_weights.shape[1],
            "reward_mean": self.reward_mean().tolist(),
            "reward_max": self.rewards.max(-1).values.tolist(),
            "ess": self.ess.tolist(),
            "log_Z": None if self.log_Z is None else self.log_Z.tolist(),
            "kl": None if kl is None else kl.tolist(),
            "seconds": self.seconds,
            "seed": self.seed,
        }
        if kl is not None and bool((kl < 0).any()):  # a KL is >= 0: say what a negative estimate is
            out["kl_note"] = f"prompt(s) {(kl < 0).nonzero().flatten().tolist()}: {NEGATIVE_KL}"
        out.update({k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.info.items() if k not in out})
        if self.prior.get("modified"):
            out["prior"] = self.prior
        return out

    def format_summary(self) -> str:
        """The diagnostics as text a person can read: one explained line per number."""
        return format_summary(self)

    def to_pyro(self):
        """One ``pyro.distributions.Empirical`` per prompt over the continuations' token ids
        (EOS-padded to a common length), weighted by ``log_weights``."""
        from pyro.distributions import Empirical

        return [Empirical(self.tokens[p], self.log_weights[p]) for p in range(self.num_prompts)]

    def to_jsonl(self, path) -> int:
        """One strict JSON object per sample (prompt, text, reward, log_weight, ...; null for a
        non-finite number, named in "nonfinite") written to ``path``; see ``posterior.export``."""
        from posterior.export import to_jsonl

        return to_jsonl(self, path)

    def to_pandas(self):
        """One row per sample as a ``pandas.DataFrame`` (needs pandas); see ``posterior.export``."""
        from posterior.export import to_pandas

        return to_pandas(self)


# --------------------------------------------------------------------------------------------------
# Text summary
# --------------------------------------------------------------------------------------------------
ESS_WARN = 0.1  # warn when the ESS is below this fraction of N
NEGATIVE_KL = "a noisy estimate below 0: the true KL is >= 0 (more samples narrow the estimate)"
R_HAT_WARN = 1.1  # warn when the split R-hat exceeds this

# Per-step / per-chain arrays (P, K) in res.info: how to read the K axis.
_SERIES = {  # key: (label, explanation, what the K axis counts)
    "ess_per_step": ("ESS per step", "ESS after each step, before resampling", "steps"),
    "log_Z_increments": ("log Z per step", "change of log Z at each step (they sum to log Z)", "steps"),
    "reward_trace": ("reward trace", "mean reward over the chains after each step", "steps"),
    "acceptance_rate_per_chain": ("chain accept.", "acceptance rate of each chain", "chains"),
}
_HIDDEN = {"ancestry", "chains", "acceptance_by_cut_bins"}  # bulky: in res.info, not in the text
_PER_PROMPT = {  # (P,) entries of res.info: label and explanation
    "acceptance_rate": ("acceptance", "fraction of proposals accepted"),
    "acceptance_rate_independence": ("acceptance (indep.)", "of the independence moves"),
    "acceptance_rate_suffix": ("acceptance (suffix)", "of the suffix moves"),
    "draws": ("draws", "proposal draws made, up to the last acceptance (rejection with n = 1 goes on to a 2nd one: unbiased log Z)"),
    "tv_estimate": ("TV(pi*, p_B)", "estimate: how far QRS's sampled p_B is from pi* (0 = exact)"),
    "kl_estimate": ("KL(pi*||p_B)", "estimate, nats: how far QRS's sampled p_B is from pi* (0 = exact)"),
    "log_bound": ("log B", "QRS bound on the log-weights (exact pi* where every weight is below it)"),
    "r_hat": ("R-hat", "split R-hat of the reward traces (about 1 once the chains have mixed)"),
    "mcmc_ess": ("MCMC ESS", "autocorrelation effective sample size of the kept reward traces"),
    "moved": ("moved", "fraction of particle Gibbs sweeps that picked a new trajectory (its acceptance rate)"),
    "restarts": ("restarts", "particle Gibbs sweeps run afresh for a chain with no state in the support yet (every particle of its earlier sweep died)"),
    "outside_support": ("off support", "particle Gibbs chains with no state in the support at the end (weight 0 here)"),
}


#: Why an MCMC trace diagnostic of one prompt is NaN when its run kept enough states.
_TRACE_KEYS = {
    "r_hat": "undefined: the kept reward trace is constant or has a non-finite reward",
    "mcmc_ess": "undefined: the kept reward trace is constant or has a non-finite reward",
}


def _num(x: float, spec: str = ".4g") -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return {math.inf: "+inf", -math.inf: "-inf"}.get(x, "NaN")
    return format(x, spec)


def _series(row: list, over: str) -> str:
    vals = [float(v) for v in row]
    finite = sorted(v for v in vals if math.isfinite(v))
    if not vals:
        return f"(no {over})"
    if not finite:
        return f"undefined over all {len(vals)} {over}"
    med = finite[len(finite) // 2] if len(finite) % 2 else 0.5 * (finite[len(finite) // 2 - 1] + finite[len(finite) // 2])
    last = "" if over == "chains" else f" / last {_num(vals[-1])}"
    hi = f" / max {_num(finite[-1])}" if over == "chains" else ""
    return f"min {_num(finite[0])} / median {_num(med)}{hi}{last} over {len(vals)} {over}"


def format_summary(res) -> str:
    """Text summary of a :class:`SampleResult` (see :meth:`SampleResult.format_summary`)."""
    P, N = res.log_weights.shape
    kl = res.kl()
    rmean, distinct = res.reward_mean().tolist(), res.distinct()
    seed = "" if res.seed is None else f", seed {res.seed}"
    lines = [f"{res.method}: beta {res.beta:g}, {N} samples per prompt, {res.seconds:.2f} s{seed}"]
    if res.prior.get("modified"):
        p = res.prior
        lines.append(f"  prior modified: temperature {p.get('temperature')}, top_k {p.get('top_k')}, top_p {p.get('top_p')} (pi0 is that distribution)")
    info = res.info

    def field_(name):  # a field of the info (None where this method has no such field)
        return getattr(info, name, None)

    width = 14
    for p in range(P):
        name = "<unconditional>" if res.prompts is None else repr(res.prompts[p])
        lines.append(f"  prompt {name}")

        def row(label, value, why=""):
            lines.append(f"    {label:<{width}} {value}" + (f"   {why}" if why else ""))

        if res.targets_posterior:
            lw = res.log_weights[p]
            live = lw[torch.isfinite(lw)]
            uniform = bool(live.numel() and (live.max() - live.min()) < 1e-6)
            row("reward mean", _num(rmean[p], "+.4f"), "weighted mean of r: the estimate of E_pi*[r]")
            ess = float(res.ess[p])
            why = "(uniform weights over the samples with finite reward)" if uniform else "(1 / sum of squared normalised weights)"
            row("ESS", f"{ess:.1f} effective samples out of {N}", why)
        else:
            row("reward mean", _num(rmean[p], "+.4f"), f"mean r of the {N} outputs ({res.method} selects, it does not sample pi*)")
            row("weights", "uniform", "every output counts once")
        if res.log_Z is not None:
            row("log Z", _num(float(res.log_Z[p]), ".4f"), "estimate of log E_pi0[exp(r/beta)], the log normaliser of pi*")
        if kl is not None:
            k = float(kl[p])
            row("KL(pi*||pi0)", _num(k, ".4f") + " nats",
                NEGATIVE_KL if k < 0 else "estimate of how far pi* moved from the prior")  # fmt: skip
        if field_("kl_bound") is not None:
            row(f"KL({res.method}||pi0)", f"<= {field_('kl_bound'):.4f} nats", "bound log k - (k-1)/k for k = best_of")
        row("distinct", f"{distinct[p]} distinct of {N} samples")
        for key, (label, why) in _PER_PROMPT.items():
            v = field_(key)
            if v is None and field_(f"{key}_note") is not None:  # undefined for this run, e.g. R-hat of 1 kept state
                row(label, "undefined", field_(f"{key}_note"))
            elif isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == P:
                undefined = key in _TRACE_KEYS and math.isnan(v[p].item())
                row(label, "undefined" if undefined else _num(v[p].item()), _TRACE_KEYS[key] if undefined else why)
        for key, (label, what, over) in _SERIES.items():
            v = field_(key)
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == P:
                row(label, _series(v[p].tolist(), over), what)
        if isinstance(field_("resampled"), torch.Tensor) and field_("resampled").dim() == 2:
            r = field_("resampled")[p]
            row("resampled", f"at {int(r.sum())} of {r.numel()} steps")
        if isinstance(field_("acceptance_by_cut"), torch.Tensor):
            cut = field_("acceptance_by_cut")[p].tolist()
            bins = field_("acceptance_by_cut_bins") or list(range(len(cut)))
            row("by cut", ", ".join(f"{b}+: {_num(c, '.2f')}" for b, c in zip(bins, cut)), "acceptance of suffix moves by cut position")
        for w in _warnings(res, p, distinct[p], info):
            lines.append(f"    warning: {w}")
    shown = set(_PER_PROMPT) | set(_SERIES) | _HIDDEN | {"resampled", "num_resampling", "acceptance_by_cut", "kl_bound", "ess"}
    shown |= {f"{k}_note" for k in _PER_PROMPT}
    rest = {k: v for k, v in info.items() if k not in shown}
    if rest:
        lines.append("  options: " + ", ".join(f"{k}={_opt(v)}" for k, v in rest.items()))
    return "\n".join(lines)


def _opt(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"<tensor {'x'.join(map(str, v.shape))} in res.info>" if v.numel() > 8 else str(v.tolist())
    if isinstance(v, float):
        return _num(v)
    return repr(v) if isinstance(v, str) else str(v)


def _warnings(res, p: int, distinct: int, info: Info) -> list[str]:
    N = res.log_weights.shape[1]
    out = []
    if res.targets_posterior and res.method != "mh" and float(res.ess[p]) < ESS_WARN * N:
        out.append(
            f"ESS {float(res.ess[p]):.1f} is below {ESS_WARN:.0%} of N={N}: a few samples carry the weight, so "
            "estimates are noisy; use more samples, a larger beta or a better proposal"
        )
    r_hat = getattr(info, "r_hat", None)
    if isinstance(r_hat, torch.Tensor) and r_hat.dim() == 1 and float(r_hat[p]) > R_HAT_WARN:
        out.append(f"R-hat {float(r_hat[p]):.3f} is above {R_HAT_WARN}: the chains have not mixed; run more steps")
    resampled = getattr(info, "resampled", None)
    if isinstance(resampled, torch.Tensor) and resampled.dim() == 2 and bool(resampled[p].any()) and distinct < N:
        out.append(
            f"{distinct} distinct of {N} samples: resampling duplicated ancestors, so the sample is less diverse than N "
            "suggests (the ESS counts weights, not distinct texts)"
        )
    return out
