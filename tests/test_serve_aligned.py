"""Issue 26 in process, on exact toys: the n choices are draws from pi* (n=1 is aligned), sampling
parameters are the prior's per request, temperature 0 is the posterior's mode, stop strings end the
prior, OpenAI's 404 and model shapes, and stream chunks that always carry choices."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tv_tolerance

pytest.importorskip("fastapi")

import posterior as pst  # noqa: E402
from posterior.exact import exact_posterior  # noqa: E402
from posterior.priors.stop import stop_string_prior  # noqa: E402
from posterior.rewards import from_spec  # noqa: E402
from posterior.serve import ServeConfig, create_app  # noqa: E402
from posterior.serve.batcher import prompt_seeds  # noqa: E402
from test_serve import word_prior  # noqa: E402

T, BETA = 3, 0.5


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    config = ServeConfig(model_name="toy", aliases=("toy-2",), max_n=256, max_prompts=16)
    with TestClient(create_app(word_prior(), config=config)) as c:
        yield c


def post(client, body, path="/v1/completions"):
    r = client.post(path, json={"model": "toy", **body})
    return r.status_code, r.json()


def exact_probs(prior, beta=BETA, prompt="good "):
    """{(text, finish_reason): pi*} and E_pi*[r], E_pi0[r] of the toy."""
    exact = exact_posterior(prior, from_spec("sentiment"), beta, T, prompt=prompt)
    eos = set(prior.eos_token_ids)
    probs = {}
    for seq, lp in zip(exact.sequences, exact.log_posterior.tolist()):
        key = (prior.decode([i for i in seq if i not in eos]), "stop" if seq[-1] in eos else "length")
        probs[key] = probs.get(key, 0.0) + math.exp(lp)
    p, q = exact.log_posterior.exp(), exact.log_prior.exp()
    return probs, float((p * exact.rewards).sum()), float((q * exact.rewards).sum())


def test_n1_choices_are_samples_of_the_posterior_not_of_the_prior(client):
    """Before issue 26 an n=1 "is" request returned the prior's draw (one particle, weight 1). Now
    240 n=1 answers (16 prompts x 15 seeded requests, each its own population of 64) match the
    enumerated pi* (TV within 3 sigma) and their mean reward is E_pi*[r], far from E_pi0[r]."""
    probs, mean_post, mean_prior = exact_probs(word_prior())
    counts, rewards, ess = {}, [], []
    for seed in range(15):
        status, body = post(client, {"prompt": ["good "] * 16, "n": 1, "max_tokens": T, "seed": seed,
                                     "posterior": {"reward": "sentiment", "beta": BETA, "method": "is", "particles": 64}})  # fmt: skip
        assert status == 200, body
        assert body["posterior"]["particles"] == 64 and body["posterior"]["choices"] == "resampled"
        for c in body["choices"]:
            key = (c["text"], c["finish_reason"])
            counts[key] = counts.get(key, 0) + 1
            rewards.append(c["posterior"]["reward"])
        ess += body["posterior"]["ess"]
    m = len(rewards)
    assert m == 240
    tv = 0.5 * sum(abs(counts.get(k, 0) / m - probs.get(k, 0.0)) for k in set(counts) | set(probs))
    n_eff = m / (1 + 1 / min(ess))  # one draw from each population; each population's error adds 1/ESS
    assert tv < tv_tolerance(probs.values(), n_eff), (tv, counts)
    mean, se = sum(rewards) / m, torch.tensor(rewards).std().item() / math.sqrt(m)
    assert abs(mean - mean_post) < 3 * se + 0.02  # + the self-normalised estimator's O(1/ESS) bias
    assert mean - mean_prior > 6 * se  # measured: 0.36 vs the prior's -0.08 (se 0.036)


def test_choices_are_drawn_by_weight_from_the_seeded_population(client):
    body = {"prompt": "good ", "n": 64, "max_tokens": T, "seed": 3, "posterior": {"reward": "sentiment", "beta": BETA, "method": "smc"}}
    status, out = post(client, body)
    assert status == 200
    res = pst.Posterior(word_prior(), from_spec("sentiment"), BETA).sample(n=16, method="smc", max_new_tokens=T, prompts=["good "], seed=prompt_seeds(3, 1))
    picks = [c["posterior"]["particle"] for c in out["choices"]]
    assert [c["text"] for c in out["choices"]] == [res.texts[0][j] for j in picks]
    assert all(res.log_weights[0, j] > -math.inf for j in picks)  # never a particle of weight 0
    assert post(client, body)[1]["choices"] == out["choices"]  # the seed fixes the choices too
    assert out["posterior"]["ess"] == pytest.approx(float(res.ess[0]), rel=1e-5)


def test_temperature_and_top_p_define_the_prior_of_the_request(client):
    prior = word_prior()
    body = {"prompt": "good ", "n": 8, "max_tokens": T, "seed": 1, "temperature": 0.5, "top_p": 0.9,
            "posterior": {"reward": "sentiment", "beta": BETA, "method": "is", "particles": 8}}  # fmt: skip
    status, out = post(client, body)
    assert status == 200 and out["posterior"]["sampling"]["temperature"] == 0.5 and out["posterior"]["sampling"]["top_p"] == 0.9
    cooled = prior.with_sampling(temperature=0.5, top_k=None, top_p=0.9)
    res = pst.Posterior(cooled, from_spec("sentiment"), BETA).sample(n=8, method="is", max_new_tokens=T, prompts=["good "], seed=prompt_seeds(1, 1))
    picks = [c["posterior"]["particle"] for c in out["choices"]]
    assert [c["posterior"]["log_prior"] for c in out["choices"]] == pytest.approx([res.log_prior[0, j].item() for j in picks], abs=1e-5)
    plain = pst.Posterior(prior, from_spec("sentiment"), BETA).sample(n=8, method="is", max_new_tokens=T, prompts=["good "], seed=prompt_seeds(1, 1))
    assert not torch.allclose(res.log_prior, plain.log_prior)  # the request's temperature changed pi0
    assert prior.temperature == 1.0  # the served prior itself is untouched


def test_temperature_0_returns_the_posterior_mode_never_the_prior_greedy_text(client):
    prior = word_prior()
    exact = exact_posterior(prior, from_spec("sentiment"), 0.1, T, prompt="good ")
    by_text: dict = {}
    for text, lp in zip(exact.texts, exact.log_posterior.tolist()):
        by_text[text] = by_text.get(text, 0.0) + math.exp(lp)
    mode = max(by_text, key=by_text.get)
    status, out = post(client, {"prompt": "good ", "n": 3, "max_tokens": T, "temperature": 0, "seed": 0,
                                "posterior": {"reward": "sentiment", "beta": 0.1, "method": "smc", "particles": 256}})  # fmt: skip
    assert status == 200 and out["posterior"]["choices"] == "mode"
    assert [c["text"] for c in out["choices"]] == [mode] * 3 and mode == "good good good "
    # the prior alone (no posterior object) at temperature 0: the population's most frequent text
    status, out = post(client, {"prompt": "good ", "n": 1, "max_tokens": 1, "temperature": 0, "seed": 0})
    assert status == 200 and out["choices"][0]["text"] in ("good ", "bad ")


def test_stop_strings_end_the_prior_and_are_not_returned(client):
    prior, stops = word_prior(), ["bad"]
    body = {"prompt": "good ", "n": 32, "max_tokens": 4, "seed": 2, "stop": stops,
            "posterior": {"reward": "sentiment", "beta": BETA, "method": "smc", "particles": 32}}  # fmt: skip
    status, out = post(client, body)
    assert status == 200, out
    stopped = stop_string_prior(prior, stops)
    res = pst.Posterior(stopped, from_spec("sentiment"), BETA).sample(n=32, method="smc", max_new_tokens=4, prompts=["good "], seed=prompt_seeds(2, 1))
    picks = [c["posterior"]["particle"] for c in out["choices"]]
    assert [c["text"] for c in out["choices"]] == [res.texts[0][j] for j in picks]
    assert all("bad" not in c["text"] for c in out["choices"])
    cut = [c for c, j in zip(out["choices"], picks) if 1 in res.tokens[0, j, : res.lengths[0, j]].tolist()]
    assert cut and all(c["finish_reason"] == "stop" for c in cut)  # cut at "bad": stopped, not "length"
    # the reward scored the stopped text: "good bad" gets the reward of ""
    assert all(c["posterior"]["reward"] == pytest.approx(from_spec("sentiment")([c["text"]])[0], abs=1e-6) for c in out["choices"])


def test_stop_is_honoured_in_smc_streams_and_only_the_usage_chunk_lacks_choices(client):
    body = {"prompt": "good ", "n": 4, "max_tokens": 6, "seed": 4, "stop": [" bad", "x"], "stream": True,
            "stream_options": {"include_usage": True},
            "posterior": {"reward": "sentiment", "beta": BETA, "method": "smc", "particles": 8}}  # fmt: skip
    r = client.post("/v1/completions", json={"model": "toy", **body})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert all(ch["choices"] for ch in chunks[:-1]) and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    texts: dict = {}
    for ch in chunks:
        for c in ch["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    status, whole = post(client, {k: v for k, v in body.items() if k not in ("stream", "stream_options")})
    assert [texts[i] for i in range(4)] == [c["text"] for c in whole["choices"]]
    assert all(" bad" not in t for t in texts.values())


def test_unknown_model_gets_openais_404_and_models_answer_in_openais_shape(client):
    status, out = post(client, {"model": "gpt-4o", "prompt": "good "})
    assert status == 404 and out["error"]["code"] == "model_not_found" and "gpt-4o" in out["error"]["message"]
    assert post(client, {"model": "toy-2", "prompt": "good ", "max_tokens": 1})[0] == 200  # an alias
    r = client.get("/v1/models/toy")
    assert r.status_code == 200 and {k: r.json()[k] for k in ("id", "object", "owned_by")} == {"id": "toy", "object": "model",
                                                                                            "owned_by": "posterior"}  # fmt: skip
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["toy", "toy-2"]


@pytest.mark.slow
def test_default_model_n1_answers_have_higher_reward_than_the_priors():
    """The issue's check on the default model: seeded n=1 requests with Sentiment at beta 0.05
    (before issue 26 an n=1 "is" answer was the prior's draw: equal rewards on average)."""
    from fastapi.testclient import TestClient

    prompts = ["The movie was", "I think the food", "My day has been", "The new phone is", "Our trip to the coast",
               "The service here", "This book", "The weather today"]  # fmt: skip
    sentiment = from_spec("sentiment")
    aligned, plain = [], []
    with TestClient(create_app(pst.load_default_prior(), config=ServeConfig(model_name="m", max_prompts=8))) as client:
        for seed in range(3):
            body = {"prompt": prompts, "n": 1, "max_tokens": 12, "seed": seed}
            status, out = post(client, {**body, "model": "m", "posterior": {"reward": "sentiment", "beta": 0.05}})
            assert status == 200, out
            aligned += [c["posterior"]["reward"] for c in out["choices"]]
            status, out = post(client, {**body, "model": "m"})
            assert status == 200, out
            plain += sentiment([c["text"] for c in out["choices"]]).tolist()
    a, b = torch.tensor(aligned), torch.tensor(plain)
    se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
    print(f"n=1 mean reward: aligned {a.mean():.3f}, prior {b.mean():.3f} (se of the difference {se:.3f}, {len(a)} answers each)")
    assert a.mean() - b.mean() > 3 * se


def test_echo_with_posterior_gives_log_pi_star_of_the_continuation_with_a_bracket(client):
    """log pi*(continuation + EOS | context) = log pi0 + r/beta - log Z(context): the bracket holds
    the enumerated value, the estimate is within it."""
    prior = word_prior()
    for beta in (0.5, 0.1):
        status, out = post(client, {"prompt": [[0, 1], [0, 0, 0]], "echo": True, "max_tokens": 0, "logprobs": 0,
                                    "posterior": {"reward": "sentiment", "beta": beta, "method": "smc", "particles": 64,
                                                  "context_tokens": 1}})  # fmt: skip
        assert status == 200, out
        info = out["posterior"]
        for cont, est, (lo, hi) in zip([(1, 2), (0, 0, 2)], info["log_prob"], info["log_prob_bracket"]):
            exact = exact_posterior(prior, from_spec("sentiment"), beta, len(cont), prompt="good ")
            want = dict(zip(exact.sequences, exact.log_posterior.tolist()))[cont]
            assert lo <= want <= hi and lo <= est <= hi, (beta, cont, want, est, lo, hi)
            assert hi - lo < 1.0  # informative, not a vacuous bracket
    status, out = post(client, {"prompt": "good bad ", "posterior": {"reward": "sentiment", "context_tokens": 1}})
    assert status == 400 and out["error"]["param"] == "posterior.context_tokens"  # needs echo


def test_min_tokens_and_repetition_penalty_define_the_prior_sampled_and_scored(client):
    """vLLM's min_tokens / repetition_penalty (before: 400 unknown field) are the request's pi0:
    the served prior samples (256 draws) match the enumerated penalised prior (TV within 3 sigma),
    each returned token's log-prob is that prior's, and their sum is the choice's log_prior (the
    weights' pi0)."""
    from posterior.exact import enumerate_continuations, total_variation
    from posterior.priors.penalties import penalized_prior

    law_prior = penalized_prior(word_prior(), min_tokens=2, repetition_penalty=1.8)
    seqs, log_prior = enumerate_continuations(law_prior, T, "good ")
    law = {s: p for s, p in zip(seqs, log_prior.exp().tolist()) if p > 0}
    status, out = post(client, {"prompt": "good ", "n": 256, "max_tokens": T, "seed": 5, "min_tokens": 2, "repetition_penalty": 1.8,
                                "logprobs": 0})  # fmt: skip
    assert status == 200, out
    assert out["posterior"]["sampling"]["min_tokens"] == 2 and out["posterior"]["sampling"]["repetition_penalty"] == 1.8
    counts: dict = {}
    for c in out["choices"]:
        ids = [WORDS_IDS[t] for t in c["logprobs"]["tokens"]]
        counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1 / 256
        assert sum(c["logprobs"]["token_logprobs"]) == pytest.approx(math.log(law[tuple(ids)]), abs=1e-5)
        assert sum(c["logprobs"]["token_logprobs"]) == pytest.approx(c["posterior"]["log_prior"], abs=1e-5)
        assert len(ids) > 2 or ids[-1] != 2  # no EOS before 2 tokens
    tv = total_variation(counts, law)
    assert tv < tv_tolerance(list(law.values()), 256), tv
    # aligned: the SMC weights use the same prior (log_prior of every choice is the penalised one)
    status, out = post(client, {"prompt": "good ", "n": 4, "max_tokens": T, "seed": 1, "min_tokens": 1, "repetition_penalty": 1.8,
                                "logprobs": 0, "posterior": {"reward": "sentiment", "beta": BETA, "method": "smc", "particles": 8}})
    assert status == 200, out
    one = penalized_prior(word_prior(), min_tokens=1, repetition_penalty=1.8)
    seqs, log_prior = enumerate_continuations(one, T, "good ")
    exact = dict(zip(seqs, log_prior.tolist()))
    for c in out["choices"]:
        ids = tuple(WORDS_IDS[t] for t in c["logprobs"]["tokens"])
        assert c["posterior"]["log_prior"] == pytest.approx(exact[ids], abs=1e-5)
    for body, field in [({"min_tokens": -1}, "min_tokens"), ({"repetition_penalty": 0}, "repetition_penalty"),
                        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens")]:  # fmt: skip
        status, out = post(client, {"prompt": "good ", **body})
        assert status == 400 and out["error"]["param"] == field, out


WORDS_IDS = {"good ": 0, "bad ": 1, "": 2}


def test_penalties_on_a_sequence_level_prior_get_400_naming_them():
    from fastapi.testclient import TestClient

    from posterior.testing import SequencePrior

    with TestClient(create_app(SequencePrior(word_prior()), config=ServeConfig(model_name="toy"))) as c:
        for body, field in [({"min_tokens": 1}, "min_tokens"), ({"repetition_penalty": 1.2}, "repetition_penalty")]:
            status, out = post(c, {"prompt": "good ", "max_tokens": 2, **body})
            assert status == 400 and out["error"]["param"] == field and "next-token" in out["error"]["message"], out
