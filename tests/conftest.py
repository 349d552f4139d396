import os

# Triton kernels run in the CPU interpreter in tests; this must be set before anything imports
# triton (conftest runs first). On a GPU, run with TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch

from posterior.exact import empirical, exact_posterior, sequence_keys, total_variation
from posterior.rewards import Callable


@pytest.fixture
def one_thread():
    """Tiny tensors: on a shared 2-core machine intra-op thread wake-ups and OpenMP barriers cost
    ~20 ms per op (30x slower on tiny models, measured), and a fixed thread count keeps CPU results
    reproducible across processes (resume tests). Restores the setting afterwards. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def a_minus_c(texts):
    """The toy reward of the training tests: +1 per "a", -0.5 per "c" (meaningful on prefixes)."""
    return [float(t.count("a")) - 0.5 * float(t.count("c")) for t in texts]


def base3_reward(texts):
    """A reward with a distinct value for every distinct text over {"a", "b"}: the text read as a
    base-3 fraction with digits a=1, b=2 (so best-of-n has a well-defined exact distribution)."""
    return [sum({"a": 1, "b": 2}[c] * 3.0 ** -(i + 1) for i, c in enumerate(t)) for t in texts]


def count_a_reward(scale: float = 1.0, *, prefixes: bool = False, name: str | None = None):
    """``scale`` x the number of "a"s (named ``f"{scale:g}*count_a"`` unless ``name``)."""
    return Callable(lambda ts: [scale * t.count("a") for t in ts], name=name or f"{scale:g}*count_a", accepts_prefixes=prefixes)


def const_reward(c: float, *, prefixes: bool = False, name: str | None = None):
    """The same reward ``c`` for every text (named ``f"const{c:g}"`` unless ``name``)."""
    return Callable(lambda ts: [c] * len(ts), name=name or f"const{c:g}", accepts_prefixes=prefixes)


@pytest.fixture
def distinct_reward():
    return Callable(base3_reward, name="base3")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama causal LM saved to a folder, for --model on the command line."""
    from posterior.testing import tiny_hf_prior

    path = tmp_path_factory.mktemp("tiny")
    prior = tiny_hf_prior("llama")
    prior.model.save_pretrained(path)
    prior.tokenizer.save_pretrained(path)
    return str(path)


def tv_tolerance(probs, n_eff: float, factor: float = 3.0) -> float:
    """A bound on TV(empirical, exact) for n_eff iid-equivalent draws: ``factor`` × the sum of
    per-atom standard deviations / 2 (E[TV] is about 0.8 × that sum / 2)."""
    return factor * 0.5 * sum(math.sqrt(p * (1 - p) / n_eff) for p in probs)


def tv_to_exact(res, exact, prompt: int = 0, weighted: bool = True) -> float:
    keys = sequence_keys(res.tokens, res.lengths)[prompt]
    return total_variation(empirical(keys, res.log_weights[prompt] if weighted else None), exact.prob())


def pooled_tv(res, exact) -> float:
    """TV between the exact posterior and the average of the P prompts' weighted empiricals
    (independent SMC runs when every prompt is the same)."""
    keys = sequence_keys(res.tokens, res.lengths)
    pooled: dict = {}
    for p, ks in enumerate(keys):
        for k, w in empirical(ks, res.log_weights[p]).items():
            pooled[k] = pooled.get(k, 0.0) + w / len(keys)
    return total_variation(pooled, exact.prob())


__all__ = ["a_minus_c", "base3_reward", "pooled_tv", "exact_posterior", "tv_tolerance", "tv_to_exact", "torch"]


@pytest.fixture
def network_attempts(monkeypatch):
    """Every DNS lookup or connect made while the test runs, each refused (so none can succeed):
    a list of (kind, address arguments)."""
    import socket

    attempts = []

    def refuse(kind):
        def call(*args, **kwargs):
            attempts.append((kind, args[1:3] if kind == "connect" else args[:2]))
            raise OSError(f"test: no network ({kind})")

        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    return attempts
