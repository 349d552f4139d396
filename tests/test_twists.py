"""Twists as objects (posterior.twists) and the SMC engine's contracts, against enumerated posteriors:
the exact optimal twist as a dense twist gives every particle the weight Z in one run; any finite
twist (from_reward, Callable, a random dense one) leaves pi* exact; the untwisted path calls the
reward once per ended particle; a twist that is -inf where completions have finite rewards raises;
the engine's hooks (reference particle, log q) weight forced particles exactly as free ones."""

import functools
import math

import pytest
import torch
from conftest import pooled_tv, tv_tolerance

import posterior as pst
from posterior.exact import exact_posterior
from posterior.priors.base import HIDDEN_STATES, DecodeState
from posterior.samplers.engine import EngineConfig, Reference, run
from posterior.samplers.smc import build_model
from posterior.testing import SequencePrior, markov_prior, two_token_prior
from posterior.twists import Prefixes, Twist

BETA = 0.5
T = 4


def score(texts):
    """+1 per "a", -0.5 per "b" (meaningful on prefixes)."""
    return [t.count("a") - 0.5 * t.count("b") for t in texts]


@pytest.fixture
def post():
    return pst.Posterior(markov_prior(), pst.rewards.Callable(score, accepts_prefixes=True), beta=BETA)


class OptimalDenseTwist(Twist):
    """psi*_t(x_1:t) = beta log E_pi0[exp(r/beta) | x_1:t] for every one-token extension, by
    enumeration; on an ended sequence (EOS, or max_new_tokens tokens) its value is r(x)."""

    name = "optimal-dense"
    dense = True

    def __init__(self, prior, reward, beta, max_new_tokens):
        self.prior, self.reward, self.beta, self.T = prior, reward, beta, max_new_tokens
        self.eos = prior.eos_token_ids[0]
        self.calls = 0

    def _lp(self, seq: tuple) -> torch.Tensor:
        return torch.log_softmax(self.prior.next_logprobs(torch.tensor([seq], dtype=torch.long).view(1, -1)).double(), -1)[0]

    @functools.cache
    def log_value(self, prompt: tuple, cont: tuple) -> float:
        """log E_pi0[exp(r/beta) | prompt, cont] for a running prefix ``cont``."""
        lp = self._lp(prompt + cont)
        terms = [lp[v].item() + self.tail(prompt, cont, v) for v in range(self.prior.vocab_size) if math.isfinite(lp[v])]
        return torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0).item()

    def tail(self, prompt, cont, v) -> float:
        """log E[exp(r/beta) | cont · v] (r/beta itself where cont · v ends)."""
        if v == self.eos or len(cont) + 1 == self.T:
            seq = cont if v == self.eos else cont + (v,)
            return self.reward([self.prior.decode(list(seq))])[0].item() / self.beta
        return self.log_value(prompt, cont + (v,))

    def next_values(self, x: Prefixes) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(len(x), self.prior.vocab_size, dtype=torch.float64)
        for b, (prompt, L) in enumerate(zip(x.prompt_ids, x.lengths.tolist())):
            cont = tuple(x.tokens[b, :L].tolist())
            for v in range(self.prior.vocab_size):
                out[b, v] = self.beta * self.tail(tuple(prompt), cont, v)
        return out


class RandomDenseTwist(Twist):
    """A fixed random finite function of (prefix, next token): exactness must not depend on it."""

    name = "random-dense"
    dense = True

    def __init__(self, vocab_size, scale=2.0):
        self.V, self.scale = vocab_size, scale

    def next_values(self, x):
        out = torch.empty(len(x), self.V, dtype=torch.float64)
        for b, L in enumerate(x.lengths.tolist()):
            g = torch.Generator().manual_seed(hash(tuple(x.tokens[b, :L].tolist())) % (2**31))
            out[b] = self.scale * torch.randn(self.V, generator=g, dtype=torch.float64)
        return out


# --------------------------------------------------------------------------------------------------
# The optimal twist, dense: zero variance in one run
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [None, "ab"])
def test_exact_optimal_dense_twist_with_tilted_proposal_gives_equal_weights_and_exact_log_Z(post, prompt):
    exact = exact_posterior(post.prior, post.reward, BETA, T, prompt=prompt)
    twist = OptimalDenseTwist(post.prior, post.reward, BETA, T)
    res = post.sample(n=32, method="smc", max_new_tokens=T, prompts=None if prompt is None else [prompt], seed=0,
                      proposal="tilted", twist=twist, ess_threshold=0.0)
    assert res.log_Z.item() == pytest.approx(exact.log_Z, abs=1e-6)  # a single run
    assert torch.allclose(res.log_weights.double(), torch.full((1, 32), -math.log(32), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(res.info["ess_per_step"], torch.tensor(32.0))
    assert twist.calls == res.info["ess_per_step"].shape[1]  # one next_values call per step, no per-text calls


def test_optimal_twist_as_a_function_of_texts_stays_exact(post):
    """The same through a non-dense twist of texts (pst.twists.Callable) and lookahead = V."""
    exact = exact_posterior(post.prior, post.reward, BETA, T)
    dense = OptimalDenseTwist(post.prior, post.reward, BETA, T)
    twist = pst.twists.Callable(lambda ts: [BETA * dense.log_value((), tuple(post.prior.encode_text(t))) for t in ts])
    res = post.sample(n=32, method="smc", max_new_tokens=T, seed=1, proposal="tilted", lookahead=4, twist=twist, ess_threshold=1.0)
    assert res.log_Z.item() == pytest.approx(exact.log_Z, abs=1e-6)
    assert torch.allclose(res.info["ess_per_step"], torch.tensor(32.0))


# --------------------------------------------------------------------------------------------------
# Any finite twist leaves pi* exact
# --------------------------------------------------------------------------------------------------
def _twists(post):
    return {
        "from_reward": pst.twists.from_reward(post.reward),
        "callable": pst.twists.Callable(lambda ts: [len(t) * 0.7 - t.count("c") for t in ts], name="len"),
        "random-dense": RandomDenseTwist(post.prior.vocab_size),
    }


@pytest.mark.parametrize("proposal", ["bootstrap", "tilted"])
@pytest.mark.parametrize("kind", ["from_reward", "callable", "random-dense"])
def test_any_finite_twist_matches_enumerated_posterior(post, kind, proposal):
    exact = exact_posterior(post.prior, post.reward, BETA, T, prompt="a")
    P, N = 30, 100
    res = post.sample(n=N, method="smc", max_new_tokens=T, prompts=["a"] * P, seed=11, ess_threshold=0.9,
                      proposal=proposal, lookahead=2, twist=_twists(post)[kind])
    assert res.info["twist"] == _twists(post)[kind].name
    n_eff = res.ess.sum().item() / 2  # resampled particles are correlated: count half
    assert pooled_tv(res, exact) < tv_tolerance(exact.prob().values(), n_eff)


@pytest.mark.parametrize("kind", ["from_reward", "random-dense"])
def test_any_finite_twist_log_Z_is_unbiased(kind):
    post = pst.Posterior(markov_prior(), pst.rewards.Callable(score, accepts_prefixes=True), beta=1.0)
    exact = exact_posterior(post.prior, post.reward, 1.0, T, prompt="a")
    runs = 200
    res = post.sample(n=16, method="smc", max_new_tokens=T, prompts=["a"] * runs, seed=7, ess_threshold=1.0,
                      proposal="tilted", twist=_twists(post)[kind])
    ratio = (res.log_Z - exact.log_Z).exp()
    se = ratio.std() / math.sqrt(runs)
    assert abs(ratio.mean().item() - 1.0) < 3 * se.item(), (ratio.mean().item(), se.item())


def test_twist_argument_takes_a_reward_a_function_or_a_twist(post):
    for twist in (post.reward, score, pst.twists.from_reward(post.reward), pst.twists.Callable(score)):
        res = post.sample(n=8, method="smc", max_new_tokens=T, seed=0, twist=twist)
        assert torch.isfinite(res.log_Z).all()
    same = [post.sample(n=8, method="smc", max_new_tokens=T, seed=0, twist=tw) for tw in ("auto", pst.twists.from_reward(post.reward))]
    assert torch.equal(same[0].tokens, same[1].tokens) and torch.equal(same[0].log_Z, same[1].log_Z)


# --------------------------------------------------------------------------------------------------
# The reward is called once per ended particle (untwisted)
# --------------------------------------------------------------------------------------------------
class Counting(pst.rewards.Reward):
    def __init__(self):
        self.texts = 0

    def score(self, texts):
        self.texts += len(texts)
        return score(texts)


@pytest.mark.parametrize("prior_kind", ["stepwise", "sequence", "sequence-no-ahead"])
def test_untwisted_smc_calls_the_reward_once_per_ended_particle(prior_kind):
    reward = Counting()
    prior = markov_prior() if prior_kind == "stepwise" else SequencePrior(markov_prior())
    post = pst.Posterior(prior, reward, beta=BETA)
    opts = {} if prior_kind == "stepwise" else dict(block_size=2, decode_ahead=prior_kind == "sequence")
    res = post.sample(n=50, method="smc", max_new_tokens=T, prompts=["a", "b"], seed=0, twist=None, **opts)
    assert reward.texts == 100  # every particle ends exactly once (this reward is finite: nothing is resampled)
    assert torch.allclose(res.rewards, torch.tensor([score(row) for row in res.texts], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Contract violations (issue 19, item 5)
# --------------------------------------------------------------------------------------------------
def test_contract_violation_twist_minus_inf_where_completions_have_finite_reward_raises():
    """A twist -inf on prefixes starting with "a", whose completions all have finite rewards: the old
    engine silently returned a wrong log Z (it killed those particles as if pi* gave them 0)."""
    post = pst.Posterior(two_token_prior(), pst.rewards.Callable(score, accepts_prefixes=True), beta=1.0)

    def no_a(texts):
        return [-math.inf if t.startswith("a") else 0.0 for t in texts]

    for opts in ({}, dict(proposal="tilted", lookahead=1), dict(block_size=2)):
        with pytest.raises(ValueError, match=r"twist 'no_a' is -inf on the prefix 'a.*' .*has reward"):
            post.sample(n=8, method="smc", max_new_tokens=3, seed=0, twist=no_a, **opts)
    seq = pst.Posterior(SequencePrior(two_token_prior()), post.reward, beta=1.0)
    with pytest.raises(ValueError, match="twist 'no_a' is -inf"):
        seq.sample(n=8, method="smc", max_new_tokens=3, seed=0, twist=no_a, block_size=2)
    # check_twist=False skips the check (and the estimate is then the old, wrong one)
    res = post.sample(n=64, method="smc", max_new_tokens=3, seed=0, twist=no_a, check_twist=False)
    assert res.log_Z.item() < exact_posterior(post.prior, post.reward, 1.0, 3).log_Z - 0.1


def test_a_valid_minus_inf_twist_passes_the_check():
    """-inf where no completion has a finite reward (a prefix check of Contains) is allowed."""
    post = pst.Posterior(two_token_prior(), pst.rewards.Contains("bb"), beta=1.0)

    def check(texts):  # -inf once too few tokens remain to complete "bb" (max_new_tokens = 4)
        return [0.0 if ("bb" in t or (2 - t.endswith("b")) <= 4 - len(t)) else -math.inf for t in texts]

    res = post.sample(n=200, method="smc", max_new_tokens=4, seed=0, twist=check)
    assert torch.isfinite(res.log_Z).all()


def test_bad_twist_values_raise_naming_the_twist(post):
    class Nan(Twist):
        name = "nanny"
        dense = True

        def next_values(self, x):
            return torch.full((len(x), 4), math.nan, dtype=torch.float64)

    with pytest.raises(ValueError, match="twist 'nanny' returned nan"):
        post.sample(n=4, method="smc", max_new_tokens=T, twist=Nan())


# --------------------------------------------------------------------------------------------------
# Hidden states
# --------------------------------------------------------------------------------------------------
class HiddenToy(pst.CallablePrior):
    """A CallablePrior with the HIDDEN_STATES capability: the "hidden state" of a row is its
    prefix length and last token (enough to check the engine passes the right rows)."""

    @property
    def capabilities(self):
        return super().capabilities | {HIDDEN_STATES}

    def _h(self, prefixes):
        return torch.tensor([[float(len(p)), float(p[-1] if p else -1)] for p in prefixes])

    def start(self, prompt_ids, *, copies=1, hidden=False):
        s = super().start(prompt_ids, copies=copies)
        return DecodeState(s.logprobs, s.lengths, s.cache, self._h(s.cache) if hidden else None)

    def extend(self, state, tokens):
        s = super().extend(state, tokens)
        return DecodeState(s.logprobs, s.lengths, s.cache, None if state.hidden is None else self._h(s.cache))

    def select(self, state, index):
        s = super().select(state, index)
        return DecodeState(s.logprobs, s.lengths, s.cache, None if state.hidden is None else state.hidden[index])


class ReadsHidden(OptimalDenseTwist):
    needs_hidden = True
    name = "reads-hidden"

    def next_values(self, x):
        full = [list(p) + x.tokens[b, :L].tolist() for b, (p, L) in enumerate(zip(x.prompt_ids, x.lengths.tolist()))]
        assert x.hidden is not None and torch.equal(x.hidden, self.prior._h(full))
        return super().next_values(x)


def test_a_twist_of_hidden_states_gets_the_rows_hidden_states():
    base = markov_prior()
    prior = HiddenToy(base.vocab, base.next_logprobs)
    post = pst.Posterior(prior, pst.rewards.Callable(score, accepts_prefixes=True), beta=BETA)
    twist = ReadsHidden(prior, post.reward, BETA, T)
    res = post.sample(n=16, method="smc", max_new_tokens=T, prompts=["a", "bc"], seed=0, proposal="tilted", twist=twist, ess_threshold=1.0)
    for p, prompt in enumerate(["a", "bc"]):
        assert res.log_Z[p].item() == pytest.approx(exact_posterior(prior, post.reward, BETA, T, prompt=prompt).log_Z, abs=1e-6)
    plain = pst.Posterior(markov_prior(), post.reward, beta=BETA)
    with pytest.raises(ValueError, match="reads the prior's hidden states.*HIDDEN_STATES"):
        plain.sample(n=4, method="smc", max_new_tokens=T, twist=ReadsHidden(plain.prior, post.reward, BETA, T))
    with pytest.raises(ValueError, match="reads hidden states; SequencePrior gives sequences only"):
        pst.Posterior(SequencePrior(markov_prior()), post.reward, beta=BETA).sample(
            n=4, method="smc", max_new_tokens=T, twist=ReadsHidden(plain.prior, post.reward, BETA, T))


# --------------------------------------------------------------------------------------------------
# Engine hooks: the reference particle and the proposal's log q
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proposal, prior_kind", [("bootstrap", "stepwise"), ("tilted", "stepwise"), ("bootstrap", "sequence")])
def test_reference_particle_is_forced_kept_as_ancestor_0_and_weighted_as_a_free_particle(proposal, prior_kind):
    inner = markov_prior()
    prior = inner if prior_kind == "stepwise" else SequencePrior(inner)
    post = pst.Posterior(prior, pst.rewards.Callable(score, accepts_prefixes=True), beta=BETA)
    prompts = ["a", "bc"]
    ids = prior.encode_prompts(prompts)
    eos = prior.eos_token_ids[0]
    ref_tokens = torch.tensor([[0, 1, 0, 2], [2, eos, eos, eos]])  # "aba" + 1 more token / "c" then EOS
    ref_lengths = torch.tensor([4, 2])
    N = 8
    model = build_model(post, ids, n=N, max_new_tokens=T, twist="auto", proposal=proposal, lookahead=2, block_size=2 if prior_kind == "sequence" else 1,
                        decode_ahead=True, check_twist=True)
    cfg = EngineConfig(beta=BETA, num_particles=N, max_new_tokens=T, ess_threshold=1.0, resampling="multinomial")
    state, infos = run(model, ids, cfg, generator=torch.Generator().manual_seed(0), pad=eos,
                       reference=Reference(ref_tokens, ref_lengths))
    p = state.particles
    for i in range(2):
        L = int(ref_lengths[i])
        assert p.tokens[i, 0, :L].tolist() == ref_tokens[i, :L].tolist() and int(p.lengths[i, 0]) == L
    assert all(bool((info.ancestors[:, 0] == 0).all()) for info in infos)
    assert any(bool(info.resampled.any()) for info in infos)
    # Weighted exactly as a free particle: the same engine with the reference's tokens drawn freely
    # would give log w = sum of increments; without resampling that is log pi0 + r/beta - log q.
    cfg0 = EngineConfig(beta=BETA, num_particles=N, max_new_tokens=T, ess_threshold=0.0, resampling="multinomial")
    model = build_model(post, ids, n=N, max_new_tokens=T, twist="auto", proposal=proposal, lookahead=2, block_size=2 if prior_kind == "sequence" else 1,
                        decode_ahead=True, check_twist=True)
    state, _ = run(model, ids, cfg0, generator=torch.Generator().manual_seed(1), pad=eos, reference=Reference(ref_tokens, ref_lengths))
    p = state.particles
    expect = p.log_prior + p.psi / BETA - p.log_q  # every particle, the reference included
    assert torch.allclose(p.log_weights, expect, atol=1e-9)
    rescored = inner.log_prob(ids, p.tokens, p.lengths).double()
    assert torch.allclose(p.log_prior, rescored, atol=1e-5)


def test_reference_needs_multinomial_resampling(post):
    with pytest.raises(ValueError, match="resampling='multinomial'"):
        post.sample(n=4, method="smc", max_new_tokens=T, reference=(torch.zeros(1, T, dtype=torch.long), torch.tensor([T])))
