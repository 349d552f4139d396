"""The overoptimisation report: rows, Gao et al. fits, the plot (proxy and gold vs sqrt(KL)).

Row fields (:data:`ROW_KEYS`; None where a method has none):

* ``method`` ("is", "smc", "bon", "policy", "exact", "bon-exact"), ``name`` (the policy's name,
  else the method), ``beta`` (None for policies), ``best_of`` (best-of-k rows).
* ``proxy_reward``, ``gold_reward``: E[r], E[g] under the method's output (estimates unless the
  method ends in "exact"); ``*_se`` their standard errors (``se_method`` says how).
* ``kl_prior``: KL(output || pi0) (``kl_prior_kind`` says estimate, bound or exact),
  ``kl_prior_se``; ``kl_prior_bracket``: None until two-sided KL bounds exist (issue 16): the
  place a (lower, upper) bracket plugs in. ``sqrt_kl`` = sqrt(kl_prior), the x axis of the fits.
* ``ess``: importance-sampling ESS of the row's weights (IS, SMC), ``seconds``, ``forward_tokens``
  (0 for pooled rows: the pool's cost is in ``report.pool``), ``estimates``: fields that are
  estimates.
* With an :class:`~posterior.rewards.Ensemble` proxy (gold): ``proxy_members`` (``gold_members``),
  each member's mean under the row's output, and ``proxy_member_std``, the mean population std
  over the members: how much the ensemble disagrees where the method goes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from posterior.overopt.fits import gao_curve

ROW_KEYS = ("method", "name", "beta", "best_of", "proxy_reward", "proxy_reward_se", "gold_reward", "gold_reward_se",
            "kl_prior", "kl_prior_se", "kl_prior_kind", "kl_prior_bracket", "sqrt_kl", "ess", "seconds",
            "forward_tokens", "estimates", "se_method")  # fmt: skip


def _plain(v):
    """JSON-safe: non-finite floats become strings ("inf", "nan"), numpy / tuples become lists."""
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return _plain(v.item())
    return v


@dataclass
class OveroptReport:
    """``rows`` (see the module docstring), ``fits`` per method, the prior's rewards (``prior``:
    from the pool; ``prior_exact`` by enumeration) and the pool's size and cost (``pool``)."""

    proxy: str
    gold: str
    prompts: list[str] | None
    n: int
    max_new_tokens: int
    seed: int
    rows: list[dict]
    fits: dict[str, dict]
    prior: dict
    pool: dict
    prior_exact: dict | None = None
    notes: list[str] = field(default_factory=list)
    num_prompts: int = 1
    draws: object = field(default=None, repr=False)  # the pool (sweep.Pool: draws + what they were drawn from), for draws= of another sweep

    def rows_of(self, method: str) -> list[dict]:
        out = [r for r in self.rows if r["method"] == method]
        if not out:
            raise KeyError(f"no rows of method {method!r}; methods are {sorted({r['method'] for r in self.rows})}")
        return out

    def to_json(self) -> dict:
        return _plain({
            "proxy": self.proxy, "gold": self.gold, "prompts": self.prompts, "n": self.n,
            "max_new_tokens": self.max_new_tokens, "seed": self.seed, "prior": self.prior, "prior_exact": self.prior_exact,
            "pool": self.pool, "rows": self.rows, "fits": self.fits, "notes": self.notes,
        })  # fmt: skip

    def save_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    def format_table(self) -> str:
        def f(v, width=9, spec=".4g"):
            if v is None:
                return "-".rjust(width)
            if isinstance(v, float):
                return f" {v:{width - 1}{spec}}"
            return str(v).rjust(width)

        lines = [f"proxy={self.proxy}  gold={self.gold}  n={self.n}  max_new_tokens={self.max_new_tokens}",
                 f"prior: proxy {self.prior['proxy_reward']:+.4f}  gold {self.prior['gold_reward']:+.4f} (pool means)",
                 f"{'method':<12}{'beta':>8}{'k':>5}{'proxy':>9}{'±se':>8}{'gold':>9}{'±se':>8}{'KL':>9}{'±se':>8}"
                 f"{'ESS':>8}{'sec':>8}  KL kind"]  # fmt: skip
        for r in self.rows:
            lines.append(
                f"{r['name']:<12}{f(r['beta'], 8, '.3g')}{f(r['best_of'], 5)}{f(r['proxy_reward'], 9)}{f(r['proxy_reward_se'], 8, '.2g')}"
                f"{f(r['gold_reward'], 9)}{f(r['gold_reward_se'], 8, '.2g')}{f(r['kl_prior'], 9)}{f(r['kl_prior_se'], 8, '.2g')}"
                f"{f(r['ess'], 8, '.1f')}{f(r['seconds'], 8, '.2f')}  {r['kl_prior_kind']}"
            )
        for m, fit in self.fits.items():
            if "error" in fit:
                lines.append(f"fit {m}: none ({fit['error']})")
                continue
            peak = "no peak (gold still rising)" if fit["kl_peak"] is None else (
                f"gold peaks at KL {fit['kl_peak']:.3g}" + (f", beta {fit['beta_peak']:.3g}" if fit.get("beta_peak") else "")
                + (f", best_of {fit['best_of_peak']}" if fit.get("best_of_peak") else "")
                + ("" if fit["peak_in_range"] else " (outside the sweep: extrapolated)"))  # fmt: skip
            ob = fit["observed_peak"]
            lines.append(f"fit {m} ({fit['form']}): alpha {fit['alpha']:.4g}, b {fit['b']:.4g}, rmse {fit['rmse']:.2g}; {peak}; "
                         f"highest measured gold {ob['gold_reward']:+.4f} at KL {ob['kl_prior']:.3g}")  # fmt: skip
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path, *, title: str | None = None) -> Path:
        """Proxy (dashed) and gold (solid) reward against sqrt(KL(·||pi0)) per method, the fitted
        gold curve (dotted) and its peak (star; a peak beyond 1.5x the sweep's largest sqrt(KL) is
        only named in the legend); writes a PNG. Matplotlib's Agg canvas, no pyplot."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.8), dpi=110)
        FigureCanvasAgg(fig)
        ax_p, ax_g = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2, sharex=None)
        methods = list(dict.fromkeys(r["method"] for r in self.rows))
        base = self.prior["gold_reward"]
        for i, m in enumerate(methods):
            pts = sorted((r for r in self.rows if r["method"] == m and r["sqrt_kl"] is not None), key=lambda r: r["sqrt_kl"])
            if not pts:
                continue
            color, style = f"C{i % 10}", ("s" if m == "policy" else "o")
            x = [r["sqrt_kl"] for r in pts]
            for ax, key in ((ax_p, "proxy_reward"), (ax_g, "gold_reward")):
                y = [r[key] for r in pts]
                se = [r.get(f"{key}_se") or 0.0 for r in pts]
                ax.errorbar(x, y, yerr=se, fmt=style + ("--" if key == "proxy_reward" else "-"), color=color,
                            markersize=4, capsize=2, label=f"{m} {'proxy' if key == 'proxy_reward' else 'gold'}")  # fmt: skip
            fit = self.fits.get(m, {})
            if "alpha" in fit:
                b0 = self.prior_exact["gold_reward"] if m.endswith("exact") and self.prior_exact else base
                # a peak far beyond the sweep is an extrapolation: name it, do not stretch the axes to it
                near = fit["d_peak"] is not None and fit["d_peak"] <= 1.5 * max(x)
                xs = np.linspace(0.0, max(x + ([fit["d_peak"]] if near else [])) * 1.05, 100)
                ax_g.plot(xs, b0 + gao_curve(xs, fit["alpha"], fit["b"], fit["form"]), ":", color=color,
                          label=f"{m} fit ({fit['form']}): α={fit['alpha']:.3g}, b={fit['b']:.3g}")  # fmt: skip
                if near:
                    where = f"KL={fit['kl_peak']:.3g}" + (f", β={fit['beta_peak']:.3g}" if fit.get("beta_peak") else "")
                    ax_g.plot([fit["d_peak"]], [b0 + fit["gain_peak"]], "*", color=color, markersize=14,
                              markeredgecolor="k", label=f"{m} gold peak ({where})")  # fmt: skip
                elif fit["d_peak"] is not None:
                    ax_g.plot([], [], "*", color=color, markersize=10, markeredgecolor="k",
                              label=f"{m} fitted peak far outside the sweep (KL={fit['kl_peak']:.3g}, extrapolated)")  # fmt: skip
        for ax, key in ((ax_p, "proxy_reward"), (ax_g, "gold_reward")):
            ax.plot([0.0], [self.prior[key]], "kD", markersize=6, label="prior pi0 (pool mean)")
        ax_p.set_title(f"proxy: {self.proxy}", fontsize=9)
        ax_g.set_title(f"gold: {self.gold}", fontsize=9)
        for ax, what in ((ax_p, "proxy"), (ax_g, "gold")):
            ax.set_xlabel("sqrt(KL(· ‖ pi0))  [sqrt(nats)]")
            ax.set_ylabel(f"mean {what} reward")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="best")
        fig.suptitle(title or "overoptimisation: proxy and gold reward against distance from the prior", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path


__all__ = ["ROW_KEYS", "OveroptReport"]
