"""Sampled vs fine-tuned approximations of pi*(x) ∝ pi0(x) exp(r(x)/beta) on one posterior.

    rep = pst.compare(post, methods=["is", "smc", "bon"], policies={"dpg": policy}, n=16)
    rep.rows             # one dict per method / policy (see posterior.compare.report)
    rep.plot("frontier.png")

Note: ``pst.compare`` is the function; import this package's pieces with
``from posterior.compare import ComparisonReport`` (``pst.compare.report`` is not an attribute).
"""

from posterior.compare.frontier import FrontierPoint, default_betas, estimated_frontier, exact_frontier
from posterior.compare.report import ROW_KEYS, ComparisonReport, compare, distinct_n

__all__ = [
    "ROW_KEYS", "ComparisonReport", "FrontierPoint", "compare", "default_betas", "distinct_n", "estimated_frontier",
    "exact_frontier",
]
