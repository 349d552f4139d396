"""Conformance helpers (posterior.testing): what every prior and every twist must satisfy, run on
the priors and twists the package ships, and shown to catch a broken one."""

import pytest
import torch

import posterior as pst
from posterior.priors.callable import CallablePrior
from posterior.priors.base import DecodeState
from posterior.testing import (SequencePrior, check_prior_conformance, check_twist_conformance, markov_prior,
                               tiny_hf_prior, two_token_prior)  # fmt: skip
from posterior.twists import Callable as CallableTwist
from posterior.twists import TabularTwist

pytestmark = pytest.mark.usefixtures("one_thread")


def count_a(texts):
    return [float(t.count("a")) for t in texts]


@pytest.mark.parametrize("make", [markov_prior, two_token_prior, lambda: SequencePrior(markov_prior())],
                         ids=["markov", "two_token", "sequence_level"])  # fmt: skip
def test_callable_toy_priors_conform(make):
    check_prior_conformance(make(), max_new_tokens=3)
    check_prior_conformance(make(), max_new_tokens=2, prompts=["a", "ba"])


def test_tiny_hf_priors_conform():
    check_prior_conformance(tiny_hf_prior("gpt2", chars="ab"), max_new_tokens=3, prompts=["ab", "b"])  # enumerable: 85 sequences
    check_prior_conformance(tiny_hf_prior("llama"), max_new_tokens=2, prompts=["hello"])


def test_toy_twists_conform():
    prior = markov_prior()
    tab = TabularTwist(prior, 3)
    g = torch.Generator().manual_seed(0)
    tab.load_trainable_state({"values": torch.randn(tab.values_table.shape, generator=g, dtype=tab.values_table.dtype)})
    check_twist_conformance(tab, prior, max_new_tokens=3)
    check_twist_conformance(CallableTwist(count_a), prior, max_new_tokens=3)
    check_twist_conformance(pst.twists.from_reward(pst.rewards.Callable(count_a)), prior, max_new_tokens=3)


def test_head_twist_on_a_tiny_hf_prior_conforms():
    prior = tiny_hf_prior("gpt2", chars="ab")
    check_twist_conformance(pst.twists.learned(prior, max_new_tokens=3), prior, prompts=["ab"], max_new_tokens=3)


class _SelectIgnoresIndex(CallablePrior):
    def select(self, state, index):  # the bug: rows in their old order, whatever index says
        return DecodeState(state.logprobs[: len(index)], state.lengths[: len(index)], list(state.cache[: len(index)]))


class _ScoresOffByOne(CallablePrior):
    def token_log_probs(self, prompt_ids, tokens, lengths, *, grad=False):
        out = super().token_log_probs(prompt_ids, tokens, lengths, grad=grad)
        return torch.where(torch.arange(out.shape[-1]) < lengths[..., None], out - 0.01, out)


class _NextValuesDisagree(TabularTwist):
    def next_values(self, x):
        return super().next_values(x) + 1.0


def test_conformance_catches_a_broken_prior_and_a_broken_twist():
    base = markov_prior()
    broken = _SelectIgnoresIndex(base.vocab, base.next_logprobs)
    with pytest.raises(AssertionError, match="select: rows of the input"):
        check_prior_conformance(broken, max_new_tokens=3)
    broken = _ScoresOffByOne(base.vocab, base.next_logprobs)
    with pytest.raises(AssertionError, match="token_log_probs"):
        check_prior_conformance(broken, max_new_tokens=3)
    twist = _NextValuesDisagree(base, 3)
    with pytest.raises(AssertionError, match="next_values at x_1:t-1 read at x_t vs values"):
        check_twist_conformance(twist, base, max_new_tokens=3)
