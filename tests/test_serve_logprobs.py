"""logprobs / top_logprobs, echo (with max_tokens 0), token-id prompts and vLLM's /tokenize and
/detokenize, in process on a Markov toy whose token log-probabilities are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("fastapi")

from posterior.priors.callable import CallablePrior  # noqa: E402
from posterior.serve import ServeConfig, create_app  # noqa: E402

VOCAB = ["good ", "bad ", "<eos>"]
START = (0.5, 0.3, 0.2)
AFTER = {0: (0.7, 0.2, 0.1), 1: (0.2, 0.5, 0.3)}  # next-token probabilities after "good " / "bad "


def p(prev: int | None, tok: int) -> float:
    return (START if prev is None else AFTER[prev])[tok]


def markov() -> CallablePrior:
    table = {None: START, **AFTER, 2: START}  # rows past EOS (padding) are still asked for

    def next_logprobs(ids):
        rows = [table[None if ids.shape[1] == 0 else int(ids[b, -1])] for b in range(ids.shape[0])]
        return torch.tensor(rows, dtype=torch.float64).log().float()

    return CallablePrior(VOCAB, next_logprobs)


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    with TestClient(create_app(markov(), config=ServeConfig(model_name="toy"))) as c:
        yield c


def post(client, body):
    r = client.post("/v1/completions", json={"model": "toy", **body})
    return r.status_code, r.json()


def test_echo_with_max_tokens_0_scores_the_prompt_first_null(client):
    """lm-eval's loglikelihood request: token ids, echo, max_tokens 0, logprobs 1 (before issue 26
    echo, logprobs and token-id prompts were each a 400)."""
    status, out = post(client, {"prompt": [[0, 1, 1], [1, 0]], "echo": True, "max_tokens": 0, "logprobs": 2,
                                "temperature": 0, "seed": 1234})  # fmt: skip
    assert status == 200, out
    first, second = (c["logprobs"] for c in out["choices"])
    assert first["tokens"] == ["good ", "bad ", "bad "] and out["choices"][0]["text"] == "good bad bad "
    assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None
    assert first["token_logprobs"][1:] == pytest.approx([math.log(p(0, 1)), math.log(p(1, 1))], abs=1e-6)
    assert first["top_logprobs"][1] == pytest.approx({"good ": math.log(0.7), "bad ": math.log(0.2)}, abs=1e-6)
    assert first["text_offset"] == [0, 5, 9]
    assert second["token_logprobs"] == [None, pytest.approx(math.log(p(1, 0)), abs=1e-6)]
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == 5


def test_logprobs_of_returned_text_are_the_priors(client):
    status, out = post(client, {"prompt": "good ", "n": 6, "max_tokens": 4, "logprobs": 1, "seed": 0,
                                "posterior": {"reward": "sentiment", "beta": 0.5, "method": "smc", "particles": 8}})  # fmt: skip
    assert status == 200, out
    for c in out["choices"]:
        lp = c["logprobs"]
        assert "".join(lp["tokens"]) == c["text"]
        ids = [VOCAB.index(t) if t else 2 for t in lp["tokens"]]  # EOS last (text ""), as vLLM
        assert (ids[-1] == 2) == (c["finish_reason"] == "stop")
        want = [math.log(p(prev, tok)) for prev, tok in zip([0, *ids[:-1]], ids)]
        assert lp["token_logprobs"] == pytest.approx(want, abs=1e-6)
        assert sum(want) == pytest.approx(c["posterior"]["log_prior"], abs=1e-5)  # log pi0 of the whole sequence
        assert all(max(top.values()) >= v - 1e-9 for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))


def test_echo_with_a_completion_and_a_stop_string(client):
    status, out = post(client, {"prompt": "bad ", "n": 8, "max_tokens": 4, "logprobs": 0, "echo": True, "stop": ["bad"], "seed": 3})
    assert status == 200, out
    for c in out["choices"]:
        assert c["text"].startswith("bad ") and "bad" not in c["text"][4:]
        lp = c["logprobs"]
        assert "".join(lp["tokens"]) == c["text"] and lp["token_logprobs"][0] is None  # tokens of the stop text left out
        assert lp["top_logprobs"][1:] == [{}] * (len(lp["tokens"]) - 1)  # logprobs 0: no alternatives


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "good ", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"prompt": "good ", "logprobs": 6}, "logprobs"),
        ({"prompt": "good ", "top_logprobs": 2}, "top_logprobs"),
        ({"prompt": [[0, 7]], "echo": True, "max_tokens": 0}, "prompt[0]"),
        ({"prompt": [], "echo": True}, "prompt"),
        ({"prompt": "good ", "logprobs": 1, "stream": "yes"}, "stream"),
    ],
)
def test_bad_logprob_requests_get_400_naming_the_field(client, body, field):
    status, out = post(client, body)
    assert status == 400 and out["error"]["param"] == field, out


def test_tokenize_and_detokenize_in_vllms_shapes(client):
    r = client.post("/tokenize", json={"model": "toy", "prompt": "good bad "})
    assert r.status_code == 200 and r.json()["tokens"] == [0, 1] and r.json()["count"] == 2
    assert client.post("/detokenize", json={"tokens": [1, 0]}).json() == {"prompt": "bad good "}
    r = client.post("/detokenize", json={"tokens": [3]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
