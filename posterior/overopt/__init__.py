"""Reward overoptimisation along the KL axis (Gao, Schulman & Hilton 2023):

    rep = pst.overoptimization(prior, proxy=Sentiment(), gold=Afinn(), betas=[...], methods=["is", "smc", "bon"])
    rep.rows          # proxy / gold reward and KL(·||pi0) per method and beta, with standard errors
    rep.fits          # Gao et al.'s forms in d = sqrt(KL), alpha, b, and where gold peaks
    rep.plot("overopt.png")

Note: ``pst.overoptimization`` is the function; import this package's pieces with
``from posterior.overopt import OveroptReport, fit_gao``.
"""

from posterior.overopt.estimators import best_of_for_kl, exact_best_of, kl_bound, pooled_best_of, pooled_is
from posterior.overopt.fits import GaoFit, fit_gao, gao_curve, gao_peak
from posterior.overopt.report import ROW_KEYS, OveroptReport
from posterior.overopt.sweep import METHODS, overoptimization

__all__ = [
    "GaoFit", "METHODS", "OveroptReport", "ROW_KEYS", "best_of_for_kl", "exact_best_of", "fit_gao", "gao_curve",
    "gao_peak", "kl_bound", "overoptimization", "pooled_best_of", "pooled_is",
]
