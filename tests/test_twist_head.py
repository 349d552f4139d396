"""The head twist over an HF prior's hidden states: dense next values, prefix values and values
agree; psi = 0 at the start; gradients reach the head only; save / load refuses another prior."""

import pytest
import torch

from posterior.testing import markov_prior, tiny_hf_prior
from posterior.twists.base import Prefixes
from posterior.twists.head import HeadTwist

ATOL = 1e-5


@pytest.fixture(scope="module")
def prior():
    return tiny_hf_prior("llama")


def randomize(twist, seed=0, scale=1.0):
    """Random head parameters (a twist far from 0), through the public trainable state."""
    g = torch.Generator().manual_seed(seed)
    twist.load_trainable_state({k: scale * torch.randn(v.shape, generator=g) for k, v in twist.trainable_state().items()})
    return twist


def _rollout(prior, prompt_ids, N, T, seed):
    """Step-by-step decode keeping hidden states: tokens (P, N, T) and each step's dense values
    (P, N, T, V) from the state before that token."""
    P = len(prompt_ids)
    g = torch.Generator().manual_seed(seed)
    state = prior.start(prompt_ids, copies=N, hidden=True)
    toks, hid = [], []
    for _ in range(T):
        hid.append(state.hidden.clone())
        tok = torch.multinomial(state.logprobs.exp(), 1, generator=g).squeeze(1)
        toks.append(tok)
        state = prior.extend(state, tok)
    return torch.stack(toks, 1).view(P, N, T), torch.stack(hid, 1).view(P, N, T, -1)


def _prefixes(prior, prompt_ids, tokens, lengths, hidden=None):
    return Prefixes(prompt_ids=prompt_ids, tokens=tokens, lengths=lengths, prompt_index=torch.zeros(len(prompt_ids), dtype=torch.long),
                    decode=prior.decode, eos_token_ids=prior.eos_token_ids, hidden=hidden)  # fmt: skip


@pytest.mark.parametrize("rank", [None, 3])
def test_untrained_head_is_zero(prior, rank):
    tw = HeadTwist(prior, rank=rank)
    state = prior.start(prior.encode_prompts(["ab"]), copies=2, hidden=True)
    x = _prefixes(prior, [[5]] * 2, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long), state.hidden)
    nv = tw.next_values(x)
    assert nv.shape == (2, prior.vocab_size) and nv.dtype == torch.float64
    assert bool((nv == 0).all())


@pytest.mark.parametrize("rank", [None, 3])
def test_next_values_prefix_values_and_values_agree(prior, rank):
    """psi(x_1:t) from prefix_values (one teacher-forced pass), from values, and as entry x_t of
    next_values at x_1:t-1 (the decode state's hidden), for a random head."""
    tw = randomize(HeadTwist(prior, rank=rank), seed=1)
    prompt_ids = prior.encode_prompts(["ab", "hello there"])
    tokens, hidden = _rollout(prior, prompt_ids, N=2, T=5, seed=0)
    lengths = torch.tensor([[5, 3], [1, 4]])
    pv = tw.prefix_values(prompt_ids, tokens, lengths)  # (P, N, T)
    assert pv.shape == (2, 2, 5)
    for p in range(2):
        for n in range(2):
            L = int(lengths[p, n])
            rows = []
            for t in range(L):  # psi(x_1:t+1) = next_values(x_1:t)[x_t+1]
                x = _prefixes(prior, [prompt_ids[p]], tokens[p, n, None, :t], torch.tensor([t]), hidden[p, n, t][None])
                rows.append(float(tw.next_values(x)[0, tokens[p, n, t]]))
            torch.testing.assert_close(pv[p, n, :L].double(), torch.tensor(rows, dtype=torch.float64), atol=ATOL, rtol=0)
            assert bool((pv[p, n, L:] == 0).all())
    # values: rows of different prompts and lengths in one call
    flat = tokens.view(4, 5)
    rows_prompts = [prompt_ids[0], prompt_ids[0], prompt_ids[1], prompt_ids[1]]
    v = tw.values(_prefixes(prior, rows_prompts, flat, lengths.view(4)))
    want = pv.view(4, 5).gather(1, (lengths.view(4) - 1)[:, None]).squeeze(1)
    torch.testing.assert_close(v, want.double(), atol=ATOL, rtol=0)


def test_gradients_reach_the_head_only(prior):
    tw = randomize(HeadTwist(prior, rank=None), seed=2)
    prompt_ids = prior.encode_prompts(["ab"])
    tokens = torch.randint(3, 20, (1, 3, 4), generator=torch.Generator().manual_seed(0))
    out = tw.prefix_values(prompt_ids, tokens, torch.tensor([[4, 2, 1]]), grad=True)
    assert out.requires_grad
    out.sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tw.trainable_parameters())
    assert all(p.grad is None for p in prior.model.parameters())
    assert not tw.prefix_values(prompt_ids, tokens, torch.tensor([[4, 2, 1]])).requires_grad


def test_zero_head_has_a_gradient(prior):
    """At psi = 0 (the start of training) the full-rank head's W and the low-rank A get gradients."""
    for rank in (None, 2):
        tw = HeadTwist(prior, rank=rank)
        prompt_ids = prior.encode_prompts(["ab"])
        tokens = torch.randint(3, 20, (1, 2, 3), generator=torch.Generator().manual_seed(0))
        tw.prefix_values(prompt_ids, tokens, torch.tensor([[3, 3]]), grad=True).sub(1).pow(2).sum().backward()  # d/dpsi = -2 at psi = 0
        name = "W" if rank is None else "A"
        assert bool(tw.params[name].grad.abs().sum() > 0)


def test_save_load_round_trip_and_refuses_another_prior(prior, tmp_path):
    tw = randomize(HeadTwist(prior, rank=4, seed=3), seed=4)
    path = tw.save(tmp_path / "head")
    back = HeadTwist.load(path, prior)
    assert back.rank == 4
    for k, v in tw.trainable_state().items():
        torch.testing.assert_close(back.trainable_state()[k], v, atol=0, rtol=0)
    with pytest.raises(ValueError, match="another prior"):
        HeadTwist.load(path, tiny_hf_prior("llama", seed=1))  # same shapes, other weights
    with pytest.raises(ValueError, match="hidden_size=32"):
        HeadTwist.load(path, tiny_hf_prior("llama", width=16))
    with pytest.raises(ValueError, match="not a saved head twist"):
        HeadTwist.load(tmp_path / "nothing", prior)


def test_bad_input(prior):
    with pytest.raises(ValueError, match="hidden states"):
        HeadTwist(markov_prior())
    with pytest.raises(ValueError, match="rank"):
        HeadTwist(prior, rank=0)
    tw = HeadTwist(prior)
    x = _prefixes(prior, [[5]], torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden=True"):
        tw.next_values(x)
    with pytest.raises(ValueError, match="lengths"):
        tw.values(x)


# --------------------------------------------------------------------------------------------------
# SMC with a head twist against an enumerated posterior (a 5-token tiny Llama, 2 new tokens: 21
# sequences, so that the TV tolerance is tight enough to reject the unweighted particles)
# --------------------------------------------------------------------------------------------------
T_ENUM = 2


def score(texts):
    """+1 per "a", -0.5 per "b" (other tokens decode to markers that count nothing)."""
    return [t.count("a") - 0.5 * t.count("b") for t in texts]


@pytest.fixture(scope="module")
def enum_post():
    import posterior as pst

    prior = tiny_hf_prior("llama", chars="ab")
    return pst.Posterior(prior, pst.rewards.Callable(score), beta=1.0)


@pytest.fixture(scope="module")
def enum_exact(enum_post):
    from posterior.exact import exact_posterior

    return exact_posterior(enum_post.prior, enum_post.reward, enum_post.beta, T_ENUM, prompt="ab")


@pytest.mark.parametrize("proposal", ["bootstrap", "tilted"])
def test_smc_with_a_random_head_twist_matches_the_enumerated_posterior(enum_post, enum_exact, proposal):
    """Any finite twist leaves the final target pi*: a random (untrained) head, far from the optimal
    twist, still gives weighted particles at TV within 3 sigma of pi*."""
    from conftest import pooled_tv, tv_tolerance

    tw = randomize(HeadTwist(enum_post.prior), seed=5, scale=1.5)
    P, N = 100, 100
    res = enum_post.sample(n=N, method="smc", max_new_tokens=T_ENUM, prompts=["ab"] * P, seed=3, twist=tw, proposal=proposal,
                           ess_threshold=0.9)  # fmt: skip
    assert res.info["resampled"].any()  # the twisted intermediate target was resampled from
    n_eff = res.ess.sum().item() / 2  # resampled particles are correlated: half the summed ESS
    assert pooled_tv(res, enum_exact) < tv_tolerance(enum_exact.prob().values(), n_eff)


@pytest.mark.parametrize("proposal", ["bootstrap", "tilted"])
def test_smc_with_a_random_head_twist_has_unbiased_Z(enum_post, enum_exact, proposal):
    """E[Ẑ] = Z over 200 independent runs of N = 16 resampling at every step (3 standard errors)."""
    import math

    tw = randomize(HeadTwist(enum_post.prior), seed=6, scale=1.5)
    runs = 200
    res = enum_post.sample(n=16, method="smc", max_new_tokens=T_ENUM, prompts=["ab"] * runs, seed=7, twist=tw, proposal=proposal,
                           ess_threshold=1.0)  # fmt: skip
    ratio = (res.log_Z.double() - enum_exact.log_Z).exp()
    se = ratio.std() / math.sqrt(runs)
    assert abs(ratio.mean().item() - 1.0) < 3 * se.item(), (ratio.mean().item(), se.item())


def test_learned_picks_the_head_for_hf_priors_and_load_reads_it_back(prior, tmp_path):
    import posterior as pst

    tw = pst.twists.learned(prior, max_new_tokens=4, rank=2)
    assert isinstance(tw, HeadTwist) and tw.rank == 2 and tw.max_new_tokens == 4
    randomize(tw, seed=7)
    back = pst.twists.load(tw.save(tmp_path / "h"), prior)
    assert isinstance(back, HeadTwist) and back.max_new_tokens == 4
    for k, v in tw.trainable_state().items():
        torch.testing.assert_close(back.trainable_state()[k], v, atol=0, rtol=0)
    with pytest.raises(ValueError, match="another prior"):
        pst.twists.load(tmp_path / "h", tiny_hf_prior("llama", seed=1))
    with pytest.raises(ValueError, match="does not take"):
        pst.twists.learned(prior, bogus=1)


@pytest.mark.parametrize("objective", ["regression", "ctl"])
def test_fit_trains_a_head_twist(enum_post, objective):
    """fit runs the head through its prefix_values: the parameters move off 0 and stay finite."""
    import posterior as pst

    tw = pst.twists.learned(enum_post.prior, max_new_tokens=T_ENUM)
    pst.train.fit(enum_post, tw, objective=objective, steps=3, batch_size=8, lr=1e-2, max_new_tokens=T_ENUM, prompts=["ab"], seed=0)
    state = tw.trainable_state()
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    assert bool(state["W"].abs().sum() > 0)
