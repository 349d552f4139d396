"""Sampled vs fine-tuned: one row per sampler and per trained policy on the same posterior.

Every row is measured on the same prompts, with the same number of decoded sequences per prompt
(``n``; best-of-k methods return n // k outputs, each the best of k draws, so they decode n too):

* ``reward_mean``: E[r] of the method's output — weighted for IS / SMC (their estimate of
  E_pi*[r]), a plain mean for best-of-n and policies (E_q[r]).
* ``kl_prior``: KL(output ‖ pi0) — for IS / SMC their estimate of KL(pi*‖pi0) = E_pi*[r]/beta - log Z;
  for best-of-n the bound log k - (k-1)/k (``kl_prior_kind: "bound"``); for a policy
  E_q[log q - log pi0].
* ``kl_target_forward`` / ``kl_target_reverse``: KL(pi*‖q) and KL(q‖pi*) where the output has a
  density q (policies): by importance sampling with the policy as proposal,
  log Ẑ = log mean w, w = pi0 e^{r/beta} / q, KL(pi*‖q) ≈ sum w̄ log w - log Ẑ (at most log n),
  KL(q‖pi*) ≈ mean(-log w) + log Ẑ. None for samplers (no density).
* ``log_Z``: the method's estimate of log Z (policies: the IS estimate above; best-of-n: None).
* ``distinct_2``: distinct token bigrams / all bigrams of the outputs, pooled per prompt (weighted
  methods are first resampled to n outputs by their weights, with the run's seed).
* ``seconds``: wall time of the sampling call; ``forward_tokens``: tokens decoded by a model.

On an enumerable prior (a ``CallablePrior`` whose support has at most ``exact_limit`` sequences)
the policy rows and the frontier are exact (computed by enumeration), and each row's
``estimates`` lists the fields that are estimates.

Brackets (``bounds=True``, :mod:`posterior.bounds`). One rejection run gives exact
samples of pi*, shared by every row. IS and SMC rows get their own two-sided estimates of log Z
and the bracket they imply on KL(pi*‖pi0) (``log_Z_bracket``, ``kl_prior_bracket``); other rows
that target pi* get the IS bracket; best-of-k gets [0, its bound]; policies get brackets on
KL(pi*‖q) and KL(q‖pi*) and KL(q‖pi0) ± z standard errors. Every end is a side's mean moved out by
z standard errors (``Bounds.log_Z_lower`` / ``log_Z_upper``); a run of a side that lost every
sample under a hard constraint (Ẑ = 0) is kept, so that end is -inf or +inf, and a note says how
many did and what helps. A row's own estimate outside its bracket is marked (``outside_bracket``)
and explained in the notes: it comes from one run, the bracket from repeats. ``bounds_max_draws``
is the rejection sampler's ``max_draws`` for the exact samples; ``progress`` shows a bar over the
brackets' runs on stderr. The upper side also bounds the frontier:
for every q, E_q[r] <= beta·(KL(q‖pi0) + log Z) (the frontier's tangent at pi*), so with log Z's
upper end U this *bound line* lies above every achievable point. A row whose point is above it,
even at the generous ends of its brackets, is flagged (``flag``): its estimates are wrong, not
better than optimal; a row above the estimated frontier curve but under the line is flagged as
within the band.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posterior.compare.frontier import (FrontierPoint, default_betas, draw_bound_band, error_bar_key, estimated_frontier,
                                        exact_frontier)
from posterior.diagnostics.weights import log_weight_stats
from posterior.exact import enumerable
from posterior.posterior import Posterior
from posterior.priors.base import Prior
from posterior.seeds import derive_seed
from posterior.samplers.common import check_proposal
from posterior.samplers.registry import get_sampler, sampler_options
from posterior.validate import check_int, check_prompts, check_real, check_seed

ROW_KEYS = ("name", "kind", "reward_mean", "kl_prior", "kl_target_forward", "kl_target_reverse", "log_Z",
            "distinct_2", "seconds", "forward_tokens")  # fmt: skip


def distinct_n(tokens: torch.Tensor, lengths: torch.Tensor, eos: Sequence[int], n: int = 2) -> float | None:
    """Distinct n-grams / all n-grams of (N, T) continuations (EOS dropped), or None if none."""
    eos = set(eos)
    grams = []
    for seq, L in zip(tokens.tolist(), lengths.tolist()):
        seq = [t for t in seq[:L] if t not in eos]
        grams += [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


BRACKET_KEYS = ("kl_prior_bracket", "kl_target_forward_bracket", "kl_target_reverse_bracket", "log_Z_bracket")
BRACKET_LABELS = ("KL(.|pi0)", "KL(pi*|q)", "KL(q|pi*)", "log Z")


def _fmt_bracket(b) -> str:
    def one(v):
        return "inf" if v == math.inf else ("-inf" if v == -math.inf else f"{v:.3f}")

    return f"[{one(b[0])}, {one(b[1])}]"


def _row_xs(rows) -> list[float]:
    return [r["kl_prior_bracket"][1] if r.get("kl_prior_bracket") else r["kl_prior"] for r in rows
            if isinstance(r.get("kl_prior"), float) and math.isfinite(r["kl_prior"])
            and (not r.get("kl_prior_bracket") or math.isfinite(r["kl_prior_bracket"][1]))]  # fmt: skip


def _interp(pts: list[FrontierPoint], x: float) -> float:
    """The frontier curve's reward at KL x (linear between points sorted by KL; flat beyond them)."""
    if x <= pts[0].kl_prior:
        return pts[0].reward_mean
    for a, b in zip(pts, pts[1:]):
        if x <= b.kl_prior:
            t = 0.0 if b.kl_prior == a.kl_prior else (x - a.kl_prior) / (b.kl_prior - a.kl_prior)
            return a.reward_mean + t * (b.reward_mean - a.reward_mean)
    return pts[-1].reward_mean


def _weighted_se(log_weights: torch.Tensor, values: torch.Tensor) -> float:
    """Standard error of the prompts' mean of self-normalised means sum w̄ v (delta method:
    Var ≈ sum w̄² (v - mean)² per prompt), 0-weight entries ignored."""
    w = log_weights.double().exp()
    v = torch.where(w > 0, values.double(), 0.0)
    m = (w * v).sum(-1, keepdim=True)
    var = (w.square() * (v - m).square()).sum(-1)  # (P,)
    return float(var.sum().sqrt() / var.shape[0])


def _json_value(v):
    """Floats through :func:`_num` (non-finite ones as strings), brackets element by element."""
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, list) and v and all(isinstance(x, float) for x in v):
        return [_num(x) for x in v]
    return v


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


@dataclass
class ComparisonReport:
    """Rows (dicts with :data:`ROW_KEYS` and ``estimates``) and the frontier; see the module doc."""

    beta: float
    reward: str
    prompts: list[str] | None
    n: int
    max_new_tokens: int
    rows: list[dict]
    frontier: list[FrontierPoint]
    frontier_exact: bool
    notes: list[str] = field(default_factory=list)
    bound_line: tuple[float, float] | None = None  # (beta, log Z upper end): reward <= beta (KL + U)

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no row named {name!r}; rows are {[r['name'] for r in self.rows]}")

    def to_json(self) -> dict:
        return {
            "beta": self.beta, "reward": self.reward, "prompts": self.prompts, "n": self.n,
            "max_new_tokens": self.max_new_tokens,
            "rows": [{k: _json_value(v) for k, v in r.items()} for r in self.rows],
            "frontier": [{**p._asdict(), "beta": _num(p.beta), "reward_mean": _num(p.reward_mean)} for p in self.frontier],
            "frontier_exact": self.frontier_exact, "notes": self.notes,
            "bound_line": None if self.bound_line is None else {"beta": self.bound_line[0], "log_Z_upper": self.bound_line[1]},
        }  # fmt: skip

    def format_table(self) -> str:
        """The rows as a text table: every number fixed-point with 3 decimals (so a column lines up
        and reads the same in every row; ``to_json`` keeps full precision), counts as ints."""

        def f(v, width=9):
            if v is None:
                return "-".rjust(width)
            if isinstance(v, float):
                return f" {v:{width - 1}.3f}"
            if isinstance(v, int):
                return f" {v:{width - 1}d}"
            return str(v).rjust(width)

        head = f"{'name':<14}{'reward':>9}{'KL(.|pi0)':>10}{'KL(pi*|q)':>10}{'KL(q|pi*)':>10}{'log Z':>9}{'ESS':>7}{'dist-2':>8}{'sec':>8}{'tokens':>8}"
        lines = [f"beta={self.beta:g} reward={self.reward} n={self.n} max_new_tokens={self.max_new_tokens}", head]
        for r in self.rows:
            lines.append(
                f"{r['name']:<14}{f(r['reward_mean'])}{f(r['kl_prior'], 10)}{f(r['kl_target_forward'], 10)}"
                f"{f(r['kl_target_reverse'], 10)}{f(r['log_Z'])}{f(r.get('ess'), 7)}{f(r['distinct_2'], 8)}{f(r['seconds'], 8)}"
                f"{f(r['forward_tokens'], 8)}  est: {','.join(r['estimates']) or 'none'}"
            )
        bracketed = [r for r in self.rows if any(r.get(k) is not None for k in BRACKET_KEYS)]
        if bracketed:
            lines.append("brackets [low, high] (each end an estimate of a bound, moved out by its standard errors):")
            for r in bracketed:
                parts = [f"{label} {_fmt_bracket(r.get(k))}" for k, label in zip(BRACKET_KEYS, BRACKET_LABELS) if r.get(k) is not None]
                flag = f"  <- {r['flag']}" if r.get("flag") else ""
                lines.append(f"  {r['name']:<12} " + "  ".join(parts) + flag)
                for text in r.get("outside_bracket", []):
                    lines.append(f"  {'':<12} note: {text} (see the notes)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Draw the reward–KL(·‖pi0) frontier and every row as a point; write a PNG to ``path``.

        Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 5), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        pts = [p for p in self.frontier if math.isfinite(p.reward_mean) and math.isfinite(p.kl_prior)]
        pts.sort(key=lambda p: p.kl_prior)
        label = "optimal frontier pi*_b (exact)" if self.frontier_exact else "optimal frontier pi*_b (IS estimate)"
        ax.plot([p.kl_prior for p in pts], [p.reward_mean for p in pts], "-" if self.frontier_exact else "--",
                color="0.3", label=label)  # fmt: skip
        at_beta = [p for p in pts if p.beta == self.beta]
        if at_beta:
            ax.plot([at_beta[0].kl_prior], [at_beta[0].reward_mean], "*", color="0.3", markersize=12,
                    label=f"pi* at beta={self.beta:g}")  # fmt: skip
        if self.bound_line is not None and not self.frontier_exact:  # reward <= beta (KL + U) for every q
            b, U = self.bound_line
            xs = [0.0] + [p.kl_prior for p in pts] + [max([p.kl_prior for p in pts] + _row_xs(self.rows)) * 1.1 + 0.1]
            xs = sorted(set(x for x in xs if math.isfinite(x)))
            curve = draw_bound_band(ax, pts, b, U, xs)  # the band stops where the frontier does
            lo = min([p.reward_mean for p in pts] + [r["reward_mean"] for r in self.rows if isinstance(r["reward_mean"], float)])
            ax.set_ylim(bottom=lo - 0.05 * abs(lo) - 0.05, top=max(max(curve), max(r["reward_mean"] or lo for r in self.rows)) + 0.15)
        markers = {"sampler": "o", "policy": "s"}
        bars_z = None
        for i, r in enumerate(self.rows):
            x, y = r["kl_prior"], r["reward_mean"]
            if not (isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y)):
                continue
            est = [e for e in ("kl_prior", "reward_mean") if e in r["estimates"]]
            kind = " (KL bound)" if r.get("kl_prior_kind") == "bound" else (" (est.)" if est else " (exact)")
            if r.get("flag"):
                kind += " [" + r["flag"].split(":")[0] + "]"
            color = f"C{i % 10}"
            ax.plot([x], [y], markers.get(r["kind"], "o"), color=color, markersize=8,
                    markerfacecolor="none" if est else color, label=f"{r['name']}{kind}")  # fmt: skip
            xb = r.get("kl_prior_bracket")
            yse = r.get("reward_mean_se") if "reward_mean" in r["estimates"] and "bracket_z" in r else None
            if xb is not None or yse is not None:
                xerr = None if xb is None else [[max(0.0, x - xb[0])], [max(0.0, xb[1] - x)]]
                yerr = None if yse is None else [[r["bracket_z"] * yse], [r["bracket_z"] * yse]]
                ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=1, capsize=3)
                bars_z = r.get("bracket_z", bars_z)
        if bars_z is not None:
            error_bar_key(ax, bars_z)  # the legend says what the bars are
        ax.set_xlabel("KL(· ‖ pi0)  [nats]")
        ax.set_ylabel("mean reward")
        ax.set_title(title or f"reward vs KL to the prior: {self.reward}, beta={self.beta:g}, n={self.n}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path


def _resampled_distinct(res, generator, eos) -> float | None:
    vals = []
    for p in range(res.log_weights.shape[0]):
        w = res.log_weights[p].double().exp()
        N = w.shape[0]
        if torch.allclose(w, torch.full_like(w, 1.0 / N)):
            idx = torch.arange(N)
        else:
            idx = torch.multinomial(w, N, replacement=True, generator=generator)
        vals.append(distinct_n(res.tokens[p][idx], res.lengths[p][idx], eos))
    return _mean(vals)


def _best_of(method: str, options: dict) -> int | None:
    """k of a best-of-k method (its option or default), None for other methods."""
    if "best_of" not in sampler_options(method):
        return None
    return check_int(f"{method} best_of", options.get("best_of", sampler_options(method)["best_of"]), 1)


def _sampler_row(post, method, *, n, max_new_tokens, prompts, seed, options, generator) -> dict:
    opts = dict(options)
    outputs = n
    k = _best_of(method, opts)
    if k is not None:
        opts["best_of"] = k
        outputs = n // k  # n decoded sequences in all (up to n mod k), as the other methods; k <= n checked
    from posterior.errors import DegenerateWeightsError

    t0 = time.perf_counter()
    try:
        res = post.sample(n=outputs, method=method, max_new_tokens=max_new_tokens, prompts=prompts, seed=seed, **opts)
    except DegenerateWeightsError as e:  # a hard constraint none of the run's samples met
        if getattr(e, "result", None) is None:
            raise
        return _degenerate_row(method, e.result, opts, time.perf_counter() - t0)
    row = {"name": method, "kind": "sampler", "reward_mean": float(res.reward_mean().mean()),
           "reward_mean_se": _weighted_se(res.log_weights, res.rewards), "targets_posterior": res.targets_posterior,
           "kl_target_forward": None, "kl_target_reverse": None, "seconds": float(res.seconds),
           "estimates": ["reward_mean"]}  # fmt: skip
    kl = res.kl()
    lengths = int(res.lengths.sum())
    if kl is not None:
        row.update(kl_prior=float(kl.mean()), kl_prior_kind="estimate of KL(pi*||pi0)")
        row["estimates"].append("kl_prior")
    elif "kl_bound" in res.info:
        row.update(kl_prior=float(res.info["kl_bound"]), kl_prior_kind="bound")
    else:
        row.update(kl_prior=None, kl_prior_kind=None)
    row["ess"] = float(res.ess.mean())  # of the output weights (n for unweighted methods)
    row["log_Z"] = None if res.log_Z is None else float(res.log_Z.mean())
    if row["log_Z"] is not None:
        row["estimates"].append("log_Z")
    row["distinct_2"] = _resampled_distinct(res, generator, post.prior.eos_token_ids)
    if "best_of" in res.info:
        row["forward_tokens"] = lengths * int(res.info["best_of"])  # the unselected draws' lengths are not kept
        row["estimates"].append("forward_tokens")
    elif method == "smc":
        row["forward_tokens"] = lengths  # final particle lengths; resampling copies prefixes
        row["estimates"].append("forward_tokens")
    else:
        row["forward_tokens"] = lengths
    row["options"] = {k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool))}
    return row


def _degenerate_row(method, res, opts, seconds) -> dict:
    """The row of a run (IS, SMC) in which every sample of some prompt has weight 0: its Ẑ there is
    0 (log Z -inf, an honest draw of the estimator); there is no sample to average, so its reward
    and KL are None, and ``degenerate`` says which prompts (the brackets still come)."""
    dead = res.info["degenerate"]
    names = ", ".join("<unconditional>" if res.prompts is None else repr(res.prompts[p][:40]) for p in dead.nonzero().flatten().tolist())
    return {
        "name": method, "kind": "sampler", "reward_mean": None, "kl_prior": None, "kl_prior_kind": None,
        "kl_target_forward": None, "kl_target_reverse": None, "targets_posterior": True, "seconds": float(seconds),
        "log_Z": float(res.log_Z.mean()), "ess": float(res.ess.mean()), "distinct_2": None,
        "forward_tokens": int(res.lengths.sum()), "estimates": ["log_Z", "forward_tokens"],
        "degenerate": f"every sample of prompt(s) {names} has weight 0 in this run (Z^ = 0): no reward or KL estimate",
        "options": {k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool))},
    }  # fmt: skip


def _plain_se(x: torch.Tensor) -> float | None:
    """Standard error of the prompts' mean of per-prompt means of (P, N) values."""
    x = x.double()
    if x.shape[1] < 2 or not bool(torch.isfinite(x).all()):
        return None
    return float(x.var(-1, correction=1).div(x.shape[1]).sum().sqrt() / x.shape[0])


def _enumerable(prior, policy, max_new_tokens, prompts, limit) -> bool:
    return enumerable(prior, max_new_tokens, limit=limit) and enumerable(policy, max_new_tokens, limit=limit)


def _exact_policy_values(post, policy, max_new_tokens, prompts) -> dict:
    """E_q[r], KL(q‖pi0), KL(pi*‖q), KL(q‖pi*), log Z by enumeration, averaged over prompts."""
    from posterior.exact import enumerate_continuations, exact_posterior

    vals = {k: [] for k in ("reward_mean", "kl_prior", "kl_target_forward", "kl_target_reverse", "log_Z")}
    for prompt in prompts or [None]:
        ex = exact_posterior(post.prior, post.reward, post.beta, max_new_tokens, prompt)
        seqs, lq = enumerate_continuations(policy, max_new_tokens, prompt)
        log_q = dict(zip(seqs, lq.tolist()))
        lq_on = torch.tensor([log_q.get(s, -math.inf) for s in ex.sequences], dtype=torch.float64)
        q, p = lq_on.exp(), ex.log_posterior.exp()
        if bool(((p > 0) & (q == 0)).any()):
            fwd = math.inf
        else:
            fwd = float(torch.where(p > 0, p * (ex.log_posterior - lq_on), 0.0).sum())
        rev = float(torch.where(q > 0, q * (lq_on - ex.log_posterior), 0.0).sum()) if not bool(((q > 0) & (p == 0)).any()) else math.inf
        vals["reward_mean"].append(float(torch.where(q > 0, q * ex.rewards, 0.0).sum()))
        vals["kl_prior"].append(float(torch.where(q > 0, q * (lq_on - ex.log_prior), 0.0).sum()))
        vals["kl_target_forward"].append(fwd)
        vals["kl_target_reverse"].append(rev)
        vals["log_Z"].append(ex.log_Z)
    return {k: sum(v) / len(v) for k, v in vals.items()}


def _policy_row(post, name, policy, *, n, max_new_tokens, prompts, generator, exact: bool) -> dict:
    prior = post.prior
    check_proposal(prior, policy)
    prompt_ids = prior.encode_prompts(prompts)
    q_ids = policy.encode_prompts(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        cont = policy.sample(q_ids, n, max_new_tokens, generator=generator)
    seconds = time.perf_counter() - t0
    log_q = policy.log_prob(q_ids, cont.tokens, cont.lengths).double()
    log_pi0 = prior.log_prob(prompt_ids, cont.tokens, cont.lengths).double()
    r = post.rewards(cont.texts)
    log_w = log_pi0 + r / post.beta - log_q  # (P, N)
    stats = log_weight_stats(log_w)
    w = stats.log_weights.exp()
    finite_rev = torch.isfinite(log_w).all(-1)
    row = {
        "name": name, "kind": "policy", "reward_mean": float(r.mean()), "kl_prior": float((log_q - log_pi0).mean()),
        "kl_prior_kind": "KL(q||pi0)",
        "kl_target_forward": float((torch.where(w > 0, w * log_w, 0.0).sum(-1) - stats.log_mean).mean()),
        "kl_target_reverse": float(torch.where(finite_rev, (-log_w).mean(-1) + stats.log_mean, math.inf).mean()),
        "log_Z": float(stats.log_mean.mean()),
        "distinct_2": _mean([distinct_n(cont.tokens[p], cont.lengths[p], prior.eos_token_ids) for p in range(len(q_ids))]),
        "seconds": seconds, "forward_tokens": int(cont.lengths.sum()),
        "ess": float(stats.ess.mean()),
        "estimates": ["reward_mean", "kl_prior", "kl_target_forward", "kl_target_reverse", "log_Z"],
        "reward_mean_se": _plain_se(r), "kl_prior_se": _plain_se(log_q - log_pi0),
    }  # fmt: skip
    if exact:
        row.update(_exact_policy_values(post, policy, max_new_tokens, prompts))
        row["estimates"] = []
    return row


def compare(
    post: Posterior,
    methods: Sequence[str] = ("is", "smc", "bon"),
    policies: dict | None = None,
    n: int = 16,
    max_new_tokens: int = 32,
    prompts: Sequence[str] | str | None = None,
    seed: int = 0,
    *,
    method_options: dict[str, dict] | None = None,  # per method, e.g. {"bon": {"best_of": 4}}
    frontier_betas: Sequence[float] | None = None,  # default: default_betas(post.beta)
    frontier_n: int | None = None,  # prior draws per prompt for an estimated frontier (default max(4n, 64))
    exact_limit: int = 20_000,  # largest support enumerated for exact policy values and frontier
    bounds: bool = False,  # two-sided brackets for every row and the bound line (module doc)
    bounds_repeats: int = 8,  # independent runs of each side (and exact samples per prompt)
    bounds_z: float = 3.0,  # bracket ends moved outwards by this many standard errors
    bounds_max_draws: int | None = None,  # prior draws per prompt for the exact samples by rejection (None: 1000·repeats)
    progress: bool = False,  # tqdm bars on stderr over the rows (methods, policies, frontier) and the brackets' runs
) -> ComparisonReport:
    """Compare samplers of ``post`` and trained policies on the same prompts; see the module doc.

    Parameters
    ----------
    post : Posterior
    methods : sampler names (``post.sample(method=...)``)
    policies : dict name -> policy (any Prior over the prior's tokens, e.g. from ``pst.train``)
    n : sequences decoded per prompt by every method and policy
    max_new_tokens, prompts, seed : as in ``post.sample``

    Returns
    -------
    ComparisonReport
        ``.rows``, ``.frontier``, ``.plot(path)``, ``.to_json()``, ``.format_table()``.
    """
    if not isinstance(post, Posterior):
        raise ValueError(f"post must be a posterior.Posterior, got {type(post).__name__}")
    n = check_int("n", n, 2)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    seed = check_seed("seed", seed)
    methods = [methods] if isinstance(methods, str) else list(methods)
    for m in methods:
        if not isinstance(m, str):
            raise ValueError(f"methods must be sampler names (str), got {m!r} in {methods!r}")
        get_sampler(m)  # an unknown name fails here, before anything samples
    if policies is not None and not isinstance(policies, dict):
        raise ValueError(f"policies must be a dict name -> policy, got {type(policies).__name__}: {policies!r}")
    policies = dict(policies or {})
    for name, policy in policies.items():
        if not isinstance(policy, Prior):
            raise ValueError(
                f"policies[{name!r}] must be a policy (a posterior prior, e.g. from pst.train.policy_from), "
                f"got {type(policy).__name__}: {str(policy)[:60]!r}"
            )
        check_proposal(post.prior, policy)
    if not methods and not policies:
        raise ValueError("nothing to compare: methods is empty and no policies are given (e.g. methods=['is', 'smc'])")
    if method_options is not None and not isinstance(method_options, dict):
        raise ValueError(f"method_options must be a dict method -> options, got {method_options!r}")
    method_options = dict(method_options or {})
    unknown = sorted(set(method_options) - set(methods))
    if unknown:
        raise ValueError(f"method_options for {unknown}, which are not in methods {methods}")
    for m in methods:  # a best-of-k row is n // k outputs of k draws each: k > n would decode more than n
        k = _best_of(m, method_options.get(m, {}))
        if k is not None and k > n:
            raise ValueError(
                f"method {m!r}: best_of={k} exceeds n={n}; compare decodes n sequences per prompt with every method "
                f"(n // best_of outputs of best_of draws each), so use best_of <= n or a larger n"
            )
    names = methods + list(policies)
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique; methods and policies give {names}")
    prompts = check_prompts(prompts)
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be a bool, got {progress!r}")
    if bounds:  # the brackets' arguments, before anything samples
        check_int("bounds_repeats", bounds_repeats, 2)
        bounds_z = check_real("bounds_z", bounds_z)
        if bounds_z < 0:
            raise ValueError(f"bounds_z must be >= 0, got {bounds_z!r}")
        if bounds_max_draws is not None:
            check_int("bounds_max_draws", bounds_max_draws, 1)
    elif bounds_max_draws is not None:
        raise ValueError(f"bounds_max_draws={bounds_max_draws!r} limits the brackets' exact samples: it needs bounds=True")
    generator = torch.Generator().manual_seed(seed)  # diversity resampling; samplers seed their own
    rows = []
    bar = tqdm(total=len(names) + 1, desc="compare", unit="row", disable=not progress, leave=False, file=sys.stderr,
               mininterval=0)  # a row takes seconds: show each
    for method in methods:
        rows.append(_sampler_row(post, method, n=n, max_new_tokens=max_new_tokens, prompts=prompts, seed=seed,
                                 options=method_options.get(method, {}), generator=generator))  # fmt: skip
        bar.set_postfix_str(f"{method} done", refresh=False)
        bar.update(1)
    for name, policy in policies.items():
        pgen = torch.Generator(device=policy.device).manual_seed(seed)
        exact = _enumerable(post.prior, policy, max_new_tokens, prompts, exact_limit)
        rows.append(_policy_row(post, name, policy, n=n, max_new_tokens=max_new_tokens, prompts=prompts,
                                generator=pgen, exact=exact))  # fmt: skip
        bar.set_postfix_str(f"{name} done", refresh=False)
        bar.update(1)
    betas = list(frontier_betas) if frontier_betas is not None else default_betas(post.beta)
    notes = []
    if _enumerable(post.prior, post.prior, max_new_tokens, prompts, exact_limit):
        frontier, frontier_exact = exact_frontier(post.prior, post.reward, max_new_tokens, prompts, betas), True
    else:
        m = frontier_n if frontier_n is not None else max(4 * n, 64)
        draws = post.sample(n=m, method="is", max_new_tokens=max_new_tokens, prompts=prompts,
                            seed=derive_seed(seed, "compare frontier"))  # fmt: skip
        frontier, frontier_exact = estimated_frontier(draws.rewards, betas), False
        notes.append(f"frontier estimated by reweighting {m} prior draws per prompt (KL at most log {m} = {math.log(m):.2f})")
    for r in rows:
        if r.get("degenerate"):
            notes.append(f"{r['name']}: {r['degenerate']} — a hard constraint none of its n samples met; use a larger n, "
                         "or method smc with proposal='tilted' and a twist towards the constraint")  # fmt: skip
    if any(r.get("kl_prior_kind") == "bound" for r in rows):
        notes.append("best-of-k KL(.||pi0) is the bound log k - (k-1)/k")
    bar.set_postfix_str("frontier done", refresh=False)
    bar.update(1)
    bar.close()
    bound_line = None
    if bounds:
        bound_line = _attach_brackets(rows, post, policies, n=n, max_new_tokens=max_new_tokens, prompts=prompts, seed=seed,
                                      method_options=method_options, repeats=bounds_repeats, z=bounds_z, notes=notes,
                                      max_draws=bounds_max_draws, progress=progress)  # fmt: skip
        _flag_rows(rows, frontier, frontier_exact, bound_line, notes)
    for r in rows:
        for k in ROW_KEYS:
            r.setdefault(k, None)
    return ComparisonReport(
        beta=post.beta, reward=post.reward.name, prompts=prompts, n=n, max_new_tokens=max_new_tokens, rows=rows,
        frontier=frontier, frontier_exact=frontier_exact, notes=notes, bound_line=bound_line,
    )  # fmt: skip


def _mean_bracket(b: torch.Tensor | None) -> list[float] | None:
    """(P, 2) per-prompt brackets -> the bracket of the prompts' mean."""
    return None if b is None else [float(b[:, 0].mean()), float(b[:, 1].mean())]


def _attach_brackets(rows, post, policies, *, n, max_new_tokens, prompts, seed, method_options, repeats, z, notes,
                     max_draws=None, progress=False):
    """Brackets on every row (module doc); returns the bound line (beta, U) or None. With
    ``progress``, a bar on stderr over the rows' bracket runs (each of which shows its own)."""
    from posterior.bounds import METHODS as BOUND_METHODS
    from posterior.bounds import Bounds, bounds
    from posterior.errors import DegenerateWeightsError

    repeats = check_int("bounds_repeats", repeats, 2)
    z = check_real("bounds_z", z)
    if max_draws is not None:
        max_draws = check_int("bounds_max_draws", max_draws, 1)
    R = post.reward.upper_bound
    bar = tqdm(total=len(rows) + 1, desc="compare brackets", unit="row", disable=not progress, leave=False,
               file=sys.stderr, mininterval=0)  # fmt: skip
    exact = None
    if R is not None:
        bar.set_postfix_str("exact samples of pi* (rejection)", refresh=True)
        try:
            exact = post.sample(n=repeats, method="rejection", max_new_tokens=max_new_tokens, prompts=prompts,
                                seed=derive_seed(seed, "compare exact samples"), reward_upper_bound=R, max_draws=max_draws)  # fmt: skip
        except DegenerateWeightsError as e:
            raise DegenerateWeightsError(
                f"compare brackets: the exact samples of pi* (rejection at R={R:g}) ran out of draws: {e} (give "
                "bounds_max_draws=..., or --bounds-max-draws N on the command line)", rows=e.rows,
            ) from e  # fmt: skip
        cost = float(exact.info["draws"].double().mean() / repeats)
        notes.append(f"brackets: {repeats} exact samples of pi* per prompt by rejection (R={R:g}), {cost:.3g} prior draws each")
    else:
        notes.append(f"brackets: reward {post.reward.name} declares no upper bound: lower sides of log Z only, no KL(pi*||.) brackets")
    bar.update(1)
    cache: dict[str, Bounds] = {}

    def run(method, **kw):
        key = method + repr(sorted(kw.items(), key=lambda kv: kv[0]))
        if key not in cache:
            cache[key] = bounds(post, n=n, repeats=repeats, max_new_tokens=max_new_tokens, prompts=prompts,
                                  method=method, exact_samples=exact, seed=derive_seed(seed, f"bounds {method}"), z=z,
                                  progress=progress, **kw)  # fmt: skip
            for note in cache[key].notes:  # degenerate runs, too few repeats: said once per bracket run
                if note.startswith(("lower side:", "not reliable")):
                    text = f"brackets ({method}{', policy' if 'policy' in kw else ''}): {note}"
                    if text not in notes:
                        notes.append(text)
        return cache[key]

    uppers = []
    for r in rows:
        bar.set_postfix_str(f"{r['name']}", refresh=True)
        bar.update(1)
        r["bracket_z"] = z
        if r["kind"] == "sampler":
            if r.get("kl_prior_kind") == "bound":  # best-of-k: KL in [0, log k - (k-1)/k] exactly
                r["kl_prior_bracket"] = [0.0, r["kl_prior"]]
                continue
            if not r.get("targets_posterior", True):
                continue
            own = r["name"] in BOUND_METHODS
            opts = {k: v for k, v in method_options.get(r["name"], {}).items()} if r["name"] == "smc" else {}
            b = run(r["name"], **opts) if own else run("is")
            r["bracket_from"] = r["name"] if own else "is"
            lower = b.log_Z_lower.mean()  # the widened ends (means moved out by z standard errors)
            upper = None if b.log_Z_upper is None else b.log_Z_upper.mean()
            r["log_Z_bracket"] = [float(lower), math.inf if upper is None else float(upper)]
            r["kl_prior_bracket"] = _mean_bracket(b.kl_prior)
            if upper is not None:
                uppers.append(float(upper))
            _explain_outside(r, b)
        else:
            b = run("is", policy=policies[r["name"]])
            r["bracket_from"] = "is"
            r["kl_target_forward_bracket"] = _mean_bracket(b.kl_target_forward)
            r["kl_target_reverse_bracket"] = _mean_bracket(b.kl_target_reverse)
            se = r.get("kl_prior_se") if r["estimates"] else 0.0
            if se is not None:
                r["kl_prior_bracket"] = [r["kl_prior"] - z * se, r["kl_prior"] + z * se]
            if b.log_Z_upper is not None:
                uppers.append(float(b.log_Z_upper.mean()))
    bar.close()
    if any(r.get("outside_bracket") for r in rows):
        notes.append(
            "a row's estimate outside its own bracket: the estimate comes from that row's one run (n samples or "
            "particles; one run's log Z^ is biased low by Jensen and noisy, and its KL estimate inherits that), the "
            "bracket from independent repeats of both sides with exact samples of pi*; read the bracket"
        )
    return (post.beta, min(uppers)) if uppers else None


def _explain_outside(row: dict, b) -> None:
    """Mark a sampler row whose own estimate (log Z, KL(pi*||pi0)) lies outside its bracket, with
    what the bracket would need: ``row["outside_bracket"]`` (a list of short texts)."""
    out = []
    for key, br in (("log_Z", row.get("log_Z_bracket")), ("kl_prior", row.get("kl_prior_bracket"))):
        v = row.get(key)
        if br is None or not isinstance(v, float) or not math.isfinite(v):
            continue
        if v < br[0] or v > br[1]:
            label = "log Z" if key == "log_Z" else "KL(.|pi0)"
            side = "below" if v < br[0] else "above"
            out.append(f"{label} estimate {v:.3f} {side} {_fmt_bracket(br)}: one run's estimate; "
                       f"the bracket rests on {b.repeats} repeats of each side")  # fmt: skip
    if out:
        row["outside_bracket"] = out


def _flag_rows(rows, frontier, frontier_exact, bound_line, notes):
    """Flag rows whose point is impossible for the true values (above the bound line or, when it is
    exact, above the frontier) even at the generous ends of their brackets."""
    pts = sorted((p for p in frontier if math.isfinite(p.kl_prior) and math.isfinite(p.reward_mean)), key=lambda p: p.kl_prior)
    for r in rows:
        x, y = r.get("kl_prior"), r.get("reward_mean")
        if not (isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y)):
            continue
        x_hi = r["kl_prior_bracket"][1] if r.get("kl_prior_bracket") else x
        y_lo = y - r["bracket_z"] * (r.get("reward_mean_se") or 0.0) if "reward_mean" in r["estimates"] else y
        if bound_line is not None and y_lo > bound_line[0] * (x_hi + bound_line[1]) + 1e-12:
            r["flag"] = "above the bound line: its estimates are off (no distribution reaches that point)"
        elif pts and frontier_exact and y_lo > _interp(pts, x_hi) + 1e-9:
            r["flag"] = "above the exact frontier: its estimates are off"
        elif pts and not frontier_exact and y > _interp(pts, x):
            r["flag"] = "in the band: above the estimated frontier curve, under the bound line"
    if any(r.get("flag", "").startswith("above") for r in rows):
        notes.append("flagged rows lie where no distribution can: read their numbers as estimation error")


def save_json(report: ComparisonReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report.to_json(), indent=1))
    return path


__all__ = ["ROW_KEYS", "ComparisonReport", "compare", "distinct_n"]
