"""The result every sampler returns, with its diagnostics.

For weighted samples (x_i, w̄_i) of pi*(x) ∝ pi0(x) exp(r(x)/beta):

    E_pi*[r]          ≈ sum_i w̄_i r(x_i)
    ESS               = 1 / sum_i w̄_i^2           (importance-sampling ESS, not MCMC's)
    KL(pi* || pi0)    = E_pi*[r]/beta - log Z      (since log pi*/pi0 = r/beta - log Z)

log Z is each method's own estimate (None where the method has none, e.g. best-of-n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
    info: dict = field(default_factory=dict)  # method-specific diagnostics
    prior: dict = field(default_factory=dict)  # how the prior was defined (temperature, top-k, ...)
    seconds: float = float("nan")

    @property
    def num_prompts(self) -> int:
        return self.log_weights.shape[0]

    def reward_mean(self) -> torch.Tensor:
        """(P,) weighted mean reward: the estimate of E_pi*[r] for methods that target pi*.
        Samples with reward -inf carry weight 0 in every method that targets pi*."""
        w = self.log_weights.double().exp()
        r = torch.where(w > 0, self.rewards.double(), 0.0)
        return (w * r).sum(-1)

    def kl(self) -> torch.Tensor | None:
        """(P,) estimate of KL(pi* || pi0) = E_pi*[r]/beta - log Z, or None without log Z."""
        if self.log_Z is None or not self.targets_posterior:
            return None
        return self.reward_mean() / self.beta - self.log_Z.double()

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
        }
        out.update({k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.info.items() if k not in out})
        if self.prior.get("modified"):
            out["prior"] = self.prior
        return out

    def format_summary(self) -> str:
        s = self.summary()
        lines = [f"method={s['method']} beta={s['beta']:g} n={s['n']} seconds={s['seconds']:.2f}"]
        for p in range(self.num_prompts):
            name = "<unconditional>" if self.prompts is None else repr(self.prompts[p])
            parts = [f"reward_mean={s['reward_mean'][p]:.4f}", f"ess={s['ess'][p]:.1f}"]
            if s["log_Z"] is not None:
                parts.append(f"log_Z={s['log_Z'][p]:.4f}")
            if s["kl"] is not None:
                parts.append(f"KL(pi*||pi0)={s['kl'][p]:.4f}")
            lines.append(f"  {name}: " + " ".join(parts))
        for k, v in s.items():
            if k not in {"method", "beta", "n", "reward_mean", "reward_max", "ess", "log_Z", "kl", "seconds"}:
                lines.append(f"  {k}: {_fmt(v)}")
        return "\n".join(lines)

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


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, list) and v and isinstance(v[0], list):  # per-chain / per-step arrays: shape only
        shape = [len(v)]
        while v and isinstance(v[0], list):
            v = v[0]
            shape.append(len(v))
        return f"<array {'x'.join(map(str, shape))}>"
    if isinstance(v, list) and v and isinstance(v[0], float):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ...]" if len(v) > 8 else "]")
    return str(v)
