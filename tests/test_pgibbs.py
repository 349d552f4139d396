"""Particle Gibbs chains against enumerated posteriors (the kernel leaves pi* invariant)."""

import math

import pytest

import posterior as pst
from posterior.exact import empirical, exact_posterior, sequence_keys, total_variation
from posterior.samplers import smc_model
from posterior.testing import SequencePrior, StreamingPrior, markov_prior

from conftest import tv_tolerance

T = 3
BETA = 0.5


def count_a(texts):
    return [float(t.count("a")) for t in texts]


def pooled_chains_tv(res, exact) -> float:
    keys = [k for row in sequence_keys(res.tokens, res.lengths) for k in row]
    return total_variation(empirical(keys), exact.prob())


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("twist", ["auto", None], ids=["twisted", "untwisted"])
@pytest.mark.parametrize("kind", ["stepwise", "sequence", "streaming"])
def test_chains_match_the_enumerated_posterior(block_size, twist, kind):
    """Step-wise priors, sequence-level ones, and streaming ones (the reference particle is forced
    and scored while the free particles' continuations keep running in the stream)."""
    toy = markov_prior(seed=3)
    prior = {"stepwise": toy, "sequence": SequencePrior(toy), "streaming": StreamingPrior(toy, lag=1)}[kind]
    reward = pst.rewards.Callable(count_a, accepts_prefixes=True)
    post = pst.Posterior(prior, reward, beta=BETA)
    exact = exact_posterior(toy, reward, BETA, T)
    n = 600
    res = post.sample(n=n, method="pgibbs", max_new_tokens=T, seed=7, particles=4, steps=6, twist=twist, block_size=block_size)
    assert res.log_Z is None and res.log_weights.shape == (1, n)
    # n independent chains: their final states are n draws of pi* after burn-in
    assert pooled_chains_tv(res, exact) < tv_tolerance(exact.prob().values(), n)
    assert 0.0 < float(res.info["moved"][0]) <= 1.0
    if kind == "streaming":
        assert prior.streams and all(s.open == 0 for s in prior.streams)


def test_tilted_proposal_and_several_prompts():
    prior = markov_prior(vocab=("a", "b", "c", "<eos>"), seed=5)
    reward = pst.rewards.Callable(count_a, accepts_prefixes=True)
    post = pst.Posterior(prior, reward, beta=BETA)
    exact = exact_posterior(prior, reward, BETA, T, "b")
    res = post.sample(n=600, method="pgibbs", max_new_tokens=T, prompts=["b", "c"], seed=3, particles=3, steps=6, proposal="tilted")
    keys = sequence_keys(res.tokens, res.lengths)[0]
    assert total_variation(empirical(keys), exact.prob()) < tv_tolerance(exact.prob().values(), 600)
    assert res.info["mcmc_ess"].shape == (2,)  # 3 kept sweeps: R-hat undefined, said as MH says it
    assert res.info["r_hat"] is None and "this run kept 3" in res.info["r_hat_note"]


def test_a_reference_weighted_by_its_whole_trajectory_breaks_exactness(monkeypatch):
    """its_hub#54: the reference weighted by its full trajectory's twist while the free particles
    carry their prefixes'. The same test as above must catch it (so it can fail)."""
    toy = markov_prior(seed=3)
    reward = pst.rewards.Callable(lambda ts: [3.0 * t.count("a") for t in ts], accepts_prefixes=True)
    post = pst.Posterior(toy, reward, beta=BETA)
    exact = exact_posterior(toy, reward, BETA, T)
    propose = smc_model.TokenModel.propose

    def broken(self, state, rows, *, forced, generator):
        move = propose(self, state, rows, forced=forced, generator=generator)
        if forced is None or not bool(forced.rows.any()):
            return move
        # the reference's potential: the twist of its WHOLE trajectory, not of its prefix
        full = reference_texts[0]
        r = reward([full])[0].item()
        pot = move.potential.clone()
        inc = move.log_increment.clone()
        sel = forced.rows & ~move.ended
        inc[sel] = inc[sel] + (r - pot[sel]) / BETA
        pot[sel] = r
        return move._replace(potential=pot, log_increment=inc)

    reference_texts = [""]
    from posterior.samplers import pgibbs as pg

    sweep = pg.sweep

    def tracking_sweep(model_of, rows, cfg, reference, **kw):
        if reference is not None:
            reference_texts[0] = toy.decode([v for v in reference.tokens[0, : int(reference.lengths[0])].tolist() if v not in toy.eos_token_ids])
        return sweep(model_of, rows, cfg, reference, **kw)

    monkeypatch.setattr(smc_model.TokenModel, "propose", broken)
    monkeypatch.setattr(pg, "sweep", tracking_sweep)
    n = 600
    res = post.sample(n=n, method="pgibbs", max_new_tokens=T, seed=7, particles=2, steps=6, ess_threshold=1.0)
    tv = pooled_chains_tv(res, exact)
    assert tv > tv_tolerance(exact.prob().values(), n)


def test_bad_options_are_refused_naming_them():
    post = pst.Posterior(markov_prior(), pst.rewards.Callable(count_a), beta=BETA)
    for kw, match in [({"particles": 0}, "particles"), ({"steps": 0}, "steps"), ({"steps": 4, "burn_in": 4}, "burn_in")]:
        with pytest.raises(ValueError, match=match):
            post.sample(n=2, method="pgibbs", max_new_tokens=T, **kw)


def test_pgibbs_with_one_particle_is_refused_naming_particles():
    """particles=1 never moves: every chain stayed at its first sweep's pick (a prior draw here) and
    was returned as a sample of pi*. The library, the command line's --option and the server's
    options go through the one table check."""
    from posterior.samplers.options import check_options

    post = pst.Posterior(markov_prior(), pst.rewards.Callable(count_a), beta=BETA)
    with pytest.raises(ValueError, match=r"particles must be >= 2 .*got 1.*never|particles must be >= 2 .*got 1"):
        post.sample(n=2, method="pgibbs", max_new_tokens=T, particles=1)
    with pytest.raises(ValueError, match="particles must be >= 2"):
        check_options("pgibbs", {"particles": 1})
    assert check_options("pgibbs", {"particles": 2}) == {"particles": 2}


def test_pgibbs_chain_whose_first_sweep_loses_every_particle_is_retried_not_failing_the_others():
    """Contains("b") with 2 particles: about 30% of first sweeps lose both (before, the whole call
    raised DegenerateWeightsError). Such a chain sweeps afresh until it has a state in the support;
    the chains match the enumerated posterior."""
    from posterior.testing import two_token_prior

    prior = two_token_prior()
    post = pst.Posterior(prior, pst.rewards.Contains("b"), beta=1.0)
    exact = exact_posterior(prior, post.reward, 1.0, 2)
    n = 600
    res = post.sample(n=n, method="pgibbs", max_new_tokens=2, seed=0, particles=2, steps=6)
    restarts, outside = int(res.info["restarts"][0]), int(res.info["outside_support"][0])
    assert restarts > 0.15 * n  # first sweeps did lose every particle (P = 0.55^2 each)
    assert outside < 0.01 * n  # almost every chain found a state (P = 0.3^6 each to miss)
    kept = [k for k, r in zip(sequence_keys(res.tokens, res.lengths)[0], res.rewards[0].tolist()) if r > -math.inf]
    assert total_variation(empirical(kept), exact.prob()) < tv_tolerance(exact.prob().values(), len(kept))
    assert "restarts" in res.format_summary()


def test_pgibbs_over_http_refuses_one_particle_and_answers_hard_constraint_requests():
    """Over HTTP 56 of 60 hard-constraint pgibbs requests got 422 (one chain's first sweep lost
    every particle and failed the call); particles=1 is refused with the library's message."""
    from fastapi.testclient import TestClient

    from posterior.serve.app import create_app

    def body(**options):
        return {"prompt": "a", "max_tokens": 2, "n": 16,
                "posterior": {"reward": "contains:b", "beta": 1.0, "method": "pgibbs", "options": options}}  # fmt: skip

    with TestClient(create_app(markov_prior())) as client:
        r = client.post("/v1/completions", json=body(particles=1))
        assert r.status_code == 400 and "particles must be >= 2" in r.json()["error"]["message"]
        for seed in range(3):
            r = client.post("/v1/completions", json={**body(particles=2, steps=4), "seed": seed})
            assert r.status_code == 200, r.json()
            assert sum("b" in c["text"] for c in r.json()["choices"]) >= 12  # chains in the support


def test_pgibbs_thins_like_mh_through_the_shared_chains_loop():
    """Particle Gibbs runs the chains loop MH runs: thin= keeps every thin-th sweep after burn-in,
    and the info says so; too few kept sweeps give a note on R-hat."""
    prior = markov_prior()
    post = pst.Posterior(prior, pst.rewards.Callable(count_a, accepts_prefixes=True), beta=BETA)
    res = post.sample(n=3, method="pgibbs", max_new_tokens=T, seed=0, particles=3, steps=9, burn_in=1, thin=2)
    info = res.info
    assert (info.steps, info.burn_in, info.thin) == (9, 1, 2) and info.reward_trace.shape == (1, 9)
    assert info.r_hat.shape == (1,) and info.r_hat_note is None  # kept sweeps 3, 5, 7, 9
    short = post.sample(n=3, method="pgibbs", max_new_tokens=T, seed=0, particles=3, steps=6, thin=2)  # kept 4, 6
    assert "split R-hat needs >= 4 kept states per chain; this run kept 2" in short.info.r_hat_note
    assert short.info.r_hat is None and short.info["r_hat"] is None  # as MH reports it (None, with the note)
    assert "R-hat          undefined" in short.format_summary()
