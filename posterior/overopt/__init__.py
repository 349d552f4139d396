"""Reward overoptimisation along the KL axis (Gao, Schulman & Hilton 2023):

    rep = pst.overoptimization(prior, proxy=Sentiment(), gold=Afinn(), betas=[...], methods=["is", "smc", "bon"])
    rep.rows          # proxy / gold reward and KL(·||pi0) per method and beta, with standard errors
    rep.fits          # Gao et al.'s forms in d = sqrt(KL), alpha, b, and where gold peaks
    rep.plot("overopt.png")

Note: ``pst.overoptimization`` is the function; import this package's pieces with
``from posterior.overopt import OveroptReport, fit_gao``.
"""

from posterior.lazy import lazy_names

METHODS = ("is", "smc", "bon")  # what the sweep runs (here, without torch: ``posterior overopt --methods`` is checked first)

__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(["best_of_for_kl", "exact_best_of", "kl_bound", "pooled_best_of", "pooled_is"], "posterior.overopt.estimators"),
    **dict.fromkeys(["GaoFit", "fit_gao", "gao_curve", "gao_peak"], "posterior.overopt.fits"),
    **dict.fromkeys(["ROW_KEYS", "OveroptReport"], "posterior.overopt.report"),
    **dict.fromkeys(["Pool", "overoptimization"], "posterior.overopt.sweep"),
})  # fmt: skip

__all__ = [
    "GaoFit", "METHODS", "OveroptReport", "Pool", "ROW_KEYS", "best_of_for_kl", "exact_best_of", "fit_gao", "gao_curve",
    "gao_peak", "kl_bound", "overoptimization", "pooled_best_of", "pooled_is",
]
