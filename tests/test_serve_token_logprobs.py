"""posterior.token_logprobs "posterior": token log-probs whose sum over any span estimates log pi*
of the span given the text before it (posterior/serve/logprobs.py), checked against the enumerated
document posterior on a toy, and lm-eval's loglikelihood through local-completions against a real
server started with --default-posterior and --token-logprobs posterior (before: every token
log-prob was log pi0, so lm-eval could only read pi0)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("fastapi")

from posterior.exact import exact_posterior  # noqa: E402
from posterior.rewards import Callable, from_spec  # noqa: E402
from posterior.serve import ServeConfig, create_app  # noqa: E402
from test_serve import word_prior  # noqa: E402

M, BETA, K = 6, 0.5, 1024  # horizon (tokens of a whole text), beta, rollouts per log Z^


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    with TestClient(create_app(word_prior(), config=ServeConfig(model_name="toy", max_particles=K))) as c:
        yield c


def post(client, body):
    r = client.post("/v1/completions", json={"model": "toy", **body})
    return r.status_code, r.json()


def exact_span(ctx: list[int], span: list[int], beta: float = BETA, horizon: int = M) -> float:
    """log pi*(the text goes on with ``span`` | ``ctx``), pi* over whole texts of at most ``horizon``
    tokens with sentiment reading the whole text: enumerated, the prefix's probability summed."""
    prior, sentiment = word_prior(), from_spec("sentiment")
    head = prior.decode(ctx)
    whole = Callable(lambda ts: [float(v) for v in sentiment([head + t for t in ts])], name="whole text")
    ex = exact_posterior(prior, whole, beta, horizon - len(ctx), prompt=head)
    return math.log(sum(math.exp(lp) for seq, lp in zip(ex.sequences, ex.log_posterior.tolist()) if list(seq[: len(span)]) == span))


ALIGNED = {"reward": "sentiment", "beta": BETA, "token_logprobs": "posterior", "horizon": M, "particles": K}


def test_summed_token_logprobs_match_the_enumerated_log_pi_star_at_every_split(client):
    """An echoed prompt and its sampled completion: for every split s, the sum of the token values
    after s is within 4 standard errors (of the two log Z^ it uses, the response's log_Z_se) plus
    the log-of-mean bias se^2 of the enumerated log pi*(x_s.. | x_<s), and the log pi0 sum is not."""
    ids = [0, 1, 0, 0]
    status, out = post(client, {"prompt": [ids], "echo": True, "max_tokens": 2, "logprobs": 2, "seed": 3, "posterior": ALIGNED})
    assert status == 200, out
    info = out["posterior"]["token_logprobs"]
    assert info["of"] == "posterior" and info["estimate"] is True and info["horizon"] == M and info["samples"] == K
    se = info["log_Z_se"][0]
    tol = 4 * math.sqrt(2) * se + se**2
    assert 0 < se < 0.05, se  # informative: tol below the pi* - pi0 gaps asserted below
    lp = out["choices"][0]["logprobs"]
    doc = [["good ", "bad ", ""].index(t) if t else 2 for t in lp["tokens"]]
    # the same tokens under pi0: the echoed prompt + choice scored alone (max_tokens 0)
    status, plain = post(client, {"prompt": [doc], "echo": True, "max_tokens": 0, "logprobs": 2})
    assert status == 200, plain
    lp0 = plain["choices"][0]["logprobs"]
    assert lp["tokens"] == lp0["tokens"]  # only the values differ
    gaps = []
    for s in range(1, len(doc)):
        got, want = sum(lp["token_logprobs"][s:]), exact_span(doc[:s], doc[s:])
        print(f"split {s}: served {got:.4f}, enumerated {want:.4f}, log pi0 {sum(lp0['token_logprobs'][s:]):.4f}, tol {tol:.4f}")
        assert abs(got - want) <= tol, (s, got, want, tol)
        gaps.append(abs(sum(lp0["token_logprobs"][s:]) - want))
    assert max(gaps) > 3 * tol  # the pi0 numbers would fail this test
    for v, top, tok in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], lp["tokens"][1:]):
        if tok in top:  # an alternative that is the token itself has the token's value
            assert top[tok] == v


def test_equal_prefixes_get_equal_estimates_across_requests(client):
    """log Z^(h) is seeded by h: lm-eval's choices of one context share its log Z^(context), so
    their differences carry only the continuations' end values."""
    a = post(client, {"prompt": [[0, 1, 0]], "echo": True, "max_tokens": 0, "logprobs": 0, "posterior": ALIGNED})[1]
    b = post(client, {"prompt": [[0, 1, 1, 1]], "echo": True, "max_tokens": 0, "logprobs": 0, "posterior": ALIGNED})[1]
    va, vb = a["choices"][0]["logprobs"]["token_logprobs"], b["choices"][0]["logprobs"]["token_logprobs"]
    assert va[:2] == vb[:2] and va[2] != vb[2]


@pytest.mark.parametrize(
    "extra,body,field",
    [
        ({"token_logprobs": "pi*"}, {}, "posterior.token_logprobs"),
        ({"horizon": 3}, {}, "posterior.horizon"),  # prompt 2 + max_tokens 2 > 3
        ({"horizon": 0}, {}, "posterior.horizon"),
        ({}, {"stop": ["bad"]}, "stop"),
    ],
)
def test_bad_token_logprob_requests_get_400_naming_the_field(client, extra, body, field):
    status, out = post(client, {"prompt": "good bad ", "max_tokens": 2, "logprobs": 1, **body, "posterior": {**ALIGNED, **extra}})
    assert status == 400 and out["error"]["param"] == field, out


# --------------------------------------------------------------------------------------------------
# lm-eval against a real server
# --------------------------------------------------------------------------------------------------
SERVED = {"reward": "length:4", "beta": 0.5, "horizon": 32, "particles": 8}


@pytest.mark.slow
def test_lm_eval_loglikelihood_reads_log_pi_star_with_token_logprobs_posterior(model_dir, tmp_path, monkeypatch):
    """One server with --default-posterior (lm-eval sends no posterior object) and --token-logprobs
    posterior: lm-eval's loglikelihoods are the telescoped log pi* estimates, recomputed here from
    the same seeded log Z^ (PrefixValues), and not the model's log pi0."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import posterior as pst
    from posterior.serve.logprobs import PrefixValues
    from test_serve import start_server, stop_server
    from test_serve_tools import _tasks

    proc, url = start_server(model_dir, "--served-model-name", "m", "--default-posterior", json.dumps(SERVED), "--token-logprobs", "posterior")
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "none")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={url}/v1/completions,model=m,tokenizer_backend=remote,tokenized_requests=True,"
            "num_concurrent=1,max_retries=1,max_length=31",
            tasks=["posterior_serve_mc"], task_manager=TaskManager(include_path=_tasks(tmp_path)), log_samples=True,
        )  # fmt: skip
    finally:
        assert stop_server(proc) == 0
    prior = pst.HFPrior.from_pretrained(model_dir)
    values = PrefixValues(prior, from_spec(SERVED["reward"]), SERVED["beta"], SERVED["particles"], SERVED["horizon"])
    tok, compared, gaps = prior.tokenizer, 0, []
    for s in out["samples"]["posterior_serve_mc"]:
        for (context, continuation), ((ll, _greedy),) in zip(s["arguments"], s["resps"]):
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx) :]
            log_pi0 = prior.log_prob([ctx], torch.tensor([[cont]]), torch.tensor([[len(cont)]]))[0, 0].item()
            want = log_pi0 + values(ctx + cont)[0] - values(ctx)[0]  # the telescoped sum of the served token values
            assert ll == pytest.approx(want, abs=1e-3), (context, continuation)
            gaps.append(abs(ll - log_pi0))
            compared += 1
    print(f"lm-eval loglikelihoods: |log pi* estimate - log pi0| per choice {[round(g, 3) for g in gaps]}")
    assert compared == 8 and max(gaps) > 0.1, gaps  # 3 + 2 + 3 choices; pi* is not pi0 here (0.2 measured)
