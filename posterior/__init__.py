"""posterior: inference-time alignment of language models as Bayesian inference.

An aligned model is the explicit posterior pi*(x) ∝ pi0(x) · exp(r(x)/beta). ``Posterior.sample``
draws from it at decoding time and reports log Z, ESS, KL(pi*||pi0) and reward statistics.

The public names are imported on first use (:mod:`posterior.lazy`): ``import posterior`` loads
neither torch nor transformers, so the command line checks its arguments in well under a second.
"""

from posterior.lazy import lazy_names

__version__ = "0.1.0"

__getattr__, __dir__ = lazy_names(__name__, {
    "Bounds": "posterior.diagnostics.bounds",
    "CallablePrior": "posterior.priors",
    "CheckpointError": "posterior.errors",
    "DegenerateWeightsError": "posterior.errors",
    "GenerateOutput": "posterior.generate",
    "HFPrior": "posterior.priors",
    "LlamaCppPrior": "posterior.priors",
    "Posterior": "posterior.posterior",
    "Prior": "posterior.priors",
    "RewardError": "posterior.rewards",
    "SAMPLERS": "posterior.samplers",
    "SampleResult": "posterior.results",
    "VLLMPrior": "posterior.priors",
    "bounds": "posterior.bounds",
    "compare": "posterior.compare",
    "generate": "posterior.generate",
    "load_default_prior": "posterior.priors",
    "overoptimization": "posterior.overopt",
    "register_sampler": "posterior.samplers",
})  # fmt: skip  (the subpackages batch, rewards, train, twists, ... are imported on first use as well)

__all__ = [
    "Bounds",
    "CallablePrior",
    "CheckpointError",
    "DegenerateWeightsError",
    "GenerateOutput",
    "HFPrior",
    "LlamaCppPrior",
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
