"""Stock OpenAI tools against a real ``posterior serve`` process (one per module, a tiny
config-built model with a chat template), with their own defaults: lm-eval's local-completions
(generate_until with temperature 0, stop strings and a seed; loglikelihood with echo and logprobs,
on local JSON data in tests/data) and local-chat-completions, LangChain's ChatOpenAI and OpenAI,
LiteLLM. Before issue 26 every one of them failed on its first request (400 for temperature, stop,
echo or logprobs) or was cut at 16 tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from test_serve import CHAT_TEMPLATE, start_server, stop_server

DATA = Path(__file__).resolve().parent / "data"
KEY = "tools-key"


@pytest.fixture(scope="module")
def served(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    proc, url = start_server(model_dir, "--served-model-name", "m", "--api-key", KEY)
    yield url, model_dir
    assert stop_server(proc) == 0


def _tasks(tmp_path) -> str:
    """lm-eval task YAMLs for the JSON data shipped in tests/data (written here: they need its path)."""
    (tmp_path / "gen.yaml").write_text(f"""task: posterior_serve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "serve_eval_gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""")
    (tmp_path / "mc.yaml").write_text(f"""task: posterior_serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "serve_eval_mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    return str(tmp_path)


@pytest.mark.slow
def test_lm_eval_local_completions_generate_until_and_loglikelihood(served, tmp_path, monkeypatch):
    """Stock settings: temperature 0, "until" stop strings, seed 1234; loglikelihood through echo +
    logprobs on token-id prompts, with the server's remote tokenizer (/tokenizer_info, /tokenize).
    The log-likelihoods equal the model's own, computed here."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import posterior as pst

    url, model_dir = served
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={url}/v1/completions,model=m,tokenizer_backend=remote,tokenized_requests=True,auth_token={KEY},"
        "num_concurrent=2,max_retries=1,max_length=128",
        tasks=["posterior_serve_gen", "posterior_serve_mc"], task_manager=TaskManager(include_path=_tasks(tmp_path)),
        log_samples=True,
    )  # fmt: skip
    assert "exact_match,none" in out["results"]["posterior_serve_gen"]
    gens = [s["resps"][0][0] for s in out["samples"]["posterior_serve_gen"]]
    assert len(gens) == 4 and all("." not in g for g in gens)  # the stop string ended them and was not returned
    assert "acc,none" in out["results"]["posterior_serve_mc"]
    prior = pst.HFPrior.from_pretrained(model_dir)
    tok, compared = prior.tokenizer, 0
    for s in out["samples"]["posterior_serve_mc"]:
        for (context, continuation), ((ll, _greedy),) in zip(s["arguments"], s["resps"]):  # one (context, continuation) per choice
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx) :]
            want = prior.log_prob([ctx], torch.tensor([[cont]]), torch.tensor([[len(cont)]]))[0, 0].item()
            assert ll == pytest.approx(want, abs=1e-3), (context, continuation)
            compared += 1
    assert compared == 8  # 3 + 2 + 3 choices


@pytest.mark.slow
def test_lm_eval_local_chat_completions_generate_until(served, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    url, _ = served
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-chat-completions", model_args=f"base_url={url}/v1/chat/completions,model=m,num_concurrent=2,max_retries=1",
        tasks=["posterior_serve_gen"], task_manager=TaskManager(include_path=_tasks(tmp_path)), apply_chat_template=True,
        log_samples=True,
    )  # fmt: skip
    gens = [s["resps"][0][0] for s in out["samples"]["posterior_serve_gen"]]
    assert len(gens) == 4 and all(isinstance(g, str) and "." not in g for g in gens)


ALIGNED = {"posterior": {"reward": "sentiment", "beta": 0.5, "method": "smc"}}


def test_langchain_chat_openai_and_openai_with_their_defaults(served):
    """LangChain's OpenAI (completions) sends temperature 0.7, top_p 1, penalties 0, n 1, and
    max_tokens 256; ChatOpenAI sends no max_tokens (the rest of the context). One plain and one
    streaming call each, aligned through extra_body / model_kwargs."""
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI, OpenAI

    url, _ = served
    chat = ChatOpenAI(model="m", base_url=url + "/v1", api_key=KEY, max_retries=0, extra_body=ALIGNED)
    msg = chat.invoke("how was the movie?")
    assert isinstance(msg.content, str) and msg.response_metadata["finish_reason"] in ("stop", "length")
    streamed = "".join(chunk.content for chunk in chat.stream("how was the movie?"))
    assert isinstance(streamed, str)
    llm = OpenAI(model="m", base_url=url + "/v1", api_key=KEY, max_retries=0, max_tokens=16, extra_body=ALIGNED)
    text = llm.invoke("the movie was")
    assert isinstance(text, str)
    assert isinstance("".join(llm.stream("the movie was")), str)


def test_litellm_plain_and_streaming(served):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read at import: no network for the cost map
    litellm = pytest.importorskip("litellm")
    url, _ = served
    kw = {"model": "openai/m", "api_base": url + "/v1", "api_key": KEY, "messages": [{"role": "user", "content": "hi"}]}
    out = litellm.completion(**kw, extra_body=ALIGNED)
    assert isinstance(out.choices[0].message.content, str) and out.choices[0].finish_reason in ("stop", "length")
    text = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(**kw, stream=True))
    assert isinstance(text, str)
