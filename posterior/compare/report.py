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
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posterior.compare.frontier import FrontierPoint, default_betas, estimated_frontier, exact_frontier
from posterior.diagnostics.weights import log_weight_stats
from posterior.posterior import Posterior, _check_prompts
from posterior.seeds import derive_seed
from posterior.samplers.common import check_proposal
from posterior.samplers.registry import sampler_options

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

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no row named {name!r}; rows are {[r['name'] for r in self.rows]}")

    def to_json(self) -> dict:
        return {
            "beta": self.beta, "reward": self.reward, "prompts": self.prompts, "n": self.n,
            "max_new_tokens": self.max_new_tokens,
            "rows": [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows],
            "frontier": [{**p._asdict(), "beta": _num(p.beta), "reward_mean": _num(p.reward_mean)} for p in self.frontier],
            "frontier_exact": self.frontier_exact, "notes": self.notes,
        }  # fmt: skip

    def format_table(self) -> str:
        def f(v, width=9):
            if v is None:
                return "-".rjust(width)
            if isinstance(v, float):
                return f" {v:{width - 1}.4g}"
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
        markers = {"sampler": "o", "policy": "s"}
        for i, r in enumerate(self.rows):
            x, y = r["kl_prior"], r["reward_mean"]
            if not (isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y)):
                continue
            est = [e for e in ("kl_prior", "reward_mean") if e in r["estimates"]]
            kind = " (KL bound)" if r.get("kl_prior_kind") == "bound" else (" (est.)" if est else " (exact)")
            color = f"C{i % 10}"
            ax.plot([x], [y], markers.get(r["kind"], "o"), color=color, markersize=8,
                    markerfacecolor="none" if est else color, label=f"{r['name']}{kind}")  # fmt: skip
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


def _sampler_row(post, method, *, n, max_new_tokens, prompts, seed, options, generator) -> dict:
    opts = dict(options)
    outputs = n
    if "best_of" in sampler_options(method):
        k = opts.setdefault("best_of", sampler_options(method)["best_of"])
        outputs = max(1, n // k)  # n decoded sequences in all, as the other methods
    res = post.sample(n=outputs, method=method, max_new_tokens=max_new_tokens, prompts=prompts, seed=seed, **opts)
    row = {"name": method, "kind": "sampler", "reward_mean": float(res.reward_mean().mean()),
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


def _enumerable(prior, policy, max_new_tokens, prompts, limit) -> bool:
    from posterior.priors.base import NEXT_TOKEN

    # Enumeration walks next-token distributions of both (start / extend / select).
    if not (prior.has(NEXT_TOKEN) and policy.has(NEXT_TOKEN)):
        return False
    V = prior.vocab_size - len(prior.eos_token_ids)
    return sum(V**t for t in range(max_new_tokens + 1)) <= limit


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
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    methods = list(methods)
    policies = dict(policies or {})
    method_options = dict(method_options or {})
    unknown = sorted(set(method_options) - set(methods))
    if unknown:
        raise ValueError(f"method_options for {unknown}, which are not in methods {methods}")
    names = methods + list(policies)
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique; methods and policies give {names}")
    prompts = _check_prompts([prompts] if isinstance(prompts, str) else prompts)
    generator = torch.Generator().manual_seed(seed)  # diversity resampling; samplers seed their own
    rows = []
    for method in methods:
        rows.append(_sampler_row(post, method, n=n, max_new_tokens=max_new_tokens, prompts=prompts, seed=seed,
                                 options=method_options.get(method, {}), generator=generator))  # fmt: skip
    for name, policy in policies.items():
        pgen = torch.Generator(device=policy.device).manual_seed(seed)
        exact = _enumerable(post.prior, policy, max_new_tokens, prompts, exact_limit)
        rows.append(_policy_row(post, name, policy, n=n, max_new_tokens=max_new_tokens, prompts=prompts,
                                generator=pgen, exact=exact))  # fmt: skip
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
    if any(r.get("kl_prior_kind") == "bound" for r in rows):
        notes.append("best-of-k KL(.||pi0) is the bound log k - (k-1)/k")
    for r in rows:
        for k in ROW_KEYS:
            r.setdefault(k, None)
    return ComparisonReport(
        beta=post.beta, reward=post.reward.name, prompts=prompts, n=n, max_new_tokens=max_new_tokens, rows=rows,
        frontier=frontier, frontier_exact=frontier_exact, notes=notes,
    )  # fmt: skip


def save_json(report: ComparisonReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report.to_json(), indent=1))
    return path


__all__ = ["ROW_KEYS", "ComparisonReport", "compare", "distinct_n"]
