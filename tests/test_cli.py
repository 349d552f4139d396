"""The command line on a tiny model saved to disk (``--model PATH``), JSON and text output."""

import json

import pytest

from posterior.cli import main
from posterior.testing import tiny_hf_prior


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    prior = tiny_hf_prior("llama")
    prior.model.save_pretrained(path)
    prior.tokenizer.save_pretrained(path)
    return str(path)


def test_json_lines_then_summary(model_dir, capsys):
    code = main(["sample", "hello", "good day", "--model", model_dir, "--reward", "sentiment", "--beta", "0.1",
                 "--method", "bon", "-n", "3", "--max-new-tokens", "6", "--option", "best_of=2", "--json"])
    assert code == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    samples, summary = lines[:-1], lines[-1]
    assert len(samples) == 6 and {s["prompt"] for s in samples} == {"hello", "good day"}
    assert set(samples[0]) == {"prompt", "text", "reward", "log_weight"}
    assert summary["method"] == "bon" and summary["best_of"] == 2
    assert set(summary) >= {"log_Z", "ess", "reward_mean", "seconds", "prior_reward_mean"}


def test_text_output_shows_posterior_prior_and_diagnostics(model_dir, capsys):
    assert main(["sample", "hello", "--model", model_dir, "-n", "4", "--max-new-tokens", "5", "--method", "is"]) == 0
    out = capsys.readouterr().out
    for part in ("posterior samples (is", "prior samples", "reward mean: posterior", "log_Z=", "KL(pi*||pi0)="):
        assert part in out


def test_bad_input_exits_2_with_a_message(model_dir, capsys):
    assert main(["sample", "hello", "--model", model_dir, "--beta", "0", "--quiet"]) == 2
    assert "beta must be a finite number > 0, got 0.0" in capsys.readouterr().err
    assert main(["sample", "hi", "--model", model_dir, "--option", "bogus=1", "--quiet"]) == 2
    assert "no option(s) ['bogus']" in capsys.readouterr().err
