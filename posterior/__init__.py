"""posterior: inference-time alignment of language models as Bayesian inference.

An aligned model is the explicit posterior pi*(x) ∝ pi0(x) · exp(r(x)/beta). ``Posterior.sample``
draws from it at decoding time and reports log Z, ESS, KL(pi*||pi0) and reward statistics.
"""

from posterior import batch, rewards, train, twists
from posterior.compare import compare
from posterior.diagnostics.bounds import Bounds, bounds
from posterior.errors import CheckpointError, DegenerateWeightsError
from posterior.generate import GenerateOutput, generate
from posterior.overopt import overoptimization
from posterior.posterior import Posterior
from posterior.priors import CallablePrior, HFPrior, Prior, VLLMPrior, load_default_prior
from posterior.results import SampleResult
from posterior.rewards import RewardError
from posterior.samplers import SAMPLERS, register_sampler

__version__ = "0.1.0"

__all__ = [
    "Bounds",
    "CallablePrior",
    "CheckpointError",
    "DegenerateWeightsError",
    "GenerateOutput",
    "HFPrior",
    "Posterior",
    "Prior",
    "RewardError",
    "SAMPLERS",
    "SampleResult",
    "VLLMPrior",
    "batch",
    "bounds",
    "compare",
    "generate",
    "load_default_prior",
    "overoptimization",
    "register_sampler",
    "rewards",
    "train",
    "twists",
]
