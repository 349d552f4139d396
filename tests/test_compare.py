"""``pst.compare``: rows for samplers and policies, the reward–KL frontier (exact on an enumerable
prior, estimated by reweighting prior draws otherwise), the plot, and the train / compare CLI."""

import json
import math

import pytest
import torch

import posterior as pst
from conftest import a_minus_c
from posterior.cli import main
from posterior.compare import ROW_KEYS, ComparisonReport, compare, distinct_n
from posterior.compare.frontier import default_betas, estimated_frontier, exact_frontier
from posterior.exact import exact_posterior
from posterior.testing import markov_prior
from posterior.rewards import Callable
from posterior.testing import two_token_prior

BETA = 0.5
M = 3


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def toy():
    prior = markov_prior(seed=3)
    post = pst.Posterior(prior, pst.rewards.Callable(a_minus_c), beta=BETA)
    return prior, post, exact_posterior(prior, post.reward, BETA, M)


@pytest.fixture(scope="module")
def trained(toy):
    prior, post, _ = toy
    policy = pst.train.policy_from(prior, max_new_tokens=M)
    pst.train.fit(post, policy, objective="dpg", steps=60, batch_size=16, lr=0.05, max_new_tokens=M)
    return policy


def test_is_compare_function_and_train_module():
    assert pst.compare is compare and pst.train.fit is not None


def test_rows_exact_on_an_enumerable_prior(toy, trained):
    prior, post, exact = toy
    untrained = pst.train.policy_from(prior, max_new_tokens=M)
    rep = pst.compare(post, methods=["is", "smc", "bon"], policies={"dpg": trained, "pi0": untrained}, n=16, max_new_tokens=M)
    assert isinstance(rep, ComparisonReport) and [r["name"] for r in rep.rows] == ["is", "smc", "bon", "dpg", "pi0"]
    for r in rep.rows:
        assert set(ROW_KEYS) <= set(r), r["name"]
    pi0 = rep.row("pi0")  # the untrained policy is the prior: every value exact
    assert pi0["estimates"] == []
    assert pi0["kl_prior"] == pytest.approx(0.0, abs=1e-5)
    assert pi0["kl_target_forward"] == pytest.approx(exact.kl, abs=1e-5)
    assert pi0["log_Z"] == pytest.approx(exact.log_Z)
    assert pi0["reward_mean"] == pytest.approx(float((exact.log_prior.exp() * exact.rewards).sum()), abs=1e-6)
    dpg = rep.row("dpg")
    assert dpg["kl_target_forward"] < exact.kl / 4 and dpg["kl_target_reverse"] >= 0
    # samplers: estimates, no density
    for name in ("is", "smc"):
        r = rep.row(name)
        assert r["kl_target_forward"] is None and r["kl_target_reverse"] is None
        assert "kl_prior" in r["estimates"] and r["log_Z"] is not None
    bon = rep.row("bon")
    k = bon["options"]["best_of"]
    assert bon["kl_prior"] == pytest.approx(math.log(k) - (k - 1) / k) and bon["kl_prior_kind"] == "bound"
    assert bon["log_Z"] is None
    assert rep.frontier_exact and any(p.beta == BETA for p in rep.frontier)
    star = next(p for p in rep.frontier if p.beta == BETA)
    assert star.kl_prior == pytest.approx(exact.kl) and star.exact


def test_every_method_decodes_n_sequences(toy):
    _, post, _ = toy
    rep = pst.compare(post, methods=["is", "bon"], n=16, max_new_tokens=M, method_options={"bon": {"best_of": 4}})
    assert rep.row("bon")["options"]["best_of"] == 4
    # IS decodes its 16 samples; BoN returns 4 outputs, each the best of 4 draws
    assert rep.row("is")["forward_tokens"] <= 16 * M and "forward_tokens" not in rep.row("is")["estimates"]
    assert "forward_tokens" in rep.row("bon")["estimates"]


def test_policy_estimates_by_importance_sampling_match_the_exact_values(toy, trained):
    """exact_limit=0 forces the estimated path: IS with the policy as proposal (n = 4000)."""
    post = toy[1]
    exact_rep = pst.compare(post, methods=[], policies={"dpg": trained}, n=16, max_new_tokens=M)
    est_rep = pst.compare(post, methods=[], policies={"dpg": trained}, n=4000, max_new_tokens=M, exact_limit=0)
    ex, est = exact_rep.row("dpg"), est_rep.row("dpg")
    assert est["estimates"] and not ex["estimates"]
    ess = est["ess"]
    assert ess > 3000  # a good proposal
    for key, tol in (("reward_mean", 0.05), ("kl_prior", 0.05), ("log_Z", 0.01), ("kl_target_reverse", 0.01), ("kl_target_forward", 0.01)):
        assert est[key] == pytest.approx(ex[key], abs=tol), key
    assert not est_rep.frontier_exact and est_rep.notes


def test_estimated_frontier_agrees_with_the_exact_one_where_the_ess_is_high(toy):
    prior, post, _ = toy
    betas = [1.0, 2.0, 4.0, math.inf]
    ex = exact_frontier(prior, post.reward, M, None, betas)
    draws = post.sample(n=20_000, method="is", max_new_tokens=M, seed=3)
    est = estimated_frontier(draws.rewards, betas)
    for e, x in zip(est, ex):
        assert e.ess > 2000
        assert e.reward_mean == pytest.approx(x.reward_mean, abs=0.05)
        assert e.kl_prior == pytest.approx(x.kl_prior, abs=0.05)
    assert ex[-1].kl_prior == 0.0
    kls = [p.kl_prior for p in exact_frontier(prior, post.reward, M, None, default_betas(BETA))]
    assert kls == sorted(kls, reverse=True)  # KL falls as beta grows
    assert any(p.beta == BETA for p in exact_frontier(prior, post.reward, M, None, default_betas(BETA)))


def test_plot_writes_a_png(toy, trained, tmp_path):
    _, post, _ = toy
    rep = pst.compare(post, methods=["is", "bon"], policies={"dpg": trained}, n=8, max_new_tokens=M)
    path = rep.plot(tmp_path / "sub" / "frontier.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    text = rep.format_table()
    assert "dpg" in text and "est:" in text
    assert json.loads(json.dumps(rep.to_json()))["rows"][0]["name"] == "is"


def test_distinct_2():
    tokens = torch.tensor([[0, 1, 0, 1, 3], [0, 1, 3, 3, 3]])
    lengths = torch.tensor([5, 3])
    # bigrams: (0,1),(1,0),(0,1) | (0,1): 2 distinct of 4
    assert distinct_n(tokens, lengths, eos=[3]) == pytest.approx(2 / 4)
    assert distinct_n(torch.tensor([[3]]), torch.tensor([1]), eos=[3]) is None


def test_compare_input_errors(toy):
    _, post, _ = toy
    with pytest.raises(ValueError, match="n must be an int >= 2, got 1"):
        pst.compare(post, n=1, max_new_tokens=M)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        pst.compare(post, methods=["nope"], n=4, max_new_tokens=M)
    with pytest.raises(ValueError, match="method_options for \\['smc'\\]"):
        pst.compare(post, methods=["is"], n=4, max_new_tokens=M, method_options={"smc": {}})


# --- command line ------------------------------------------------------------------------------
def test_cli_train_then_compare(model_dir, tmp_path, capsys):
    ckpt = tmp_path / "run"
    # sentiment, the reward compared below (contains:a was met by none of the 12 draws: DPG trained nothing)
    args = ["train", "hello", "--model", model_dir, "--reward", "sentiment", "--beta", "1", "--objective", "dpg",
            "--steps", "3", "--batch-size", "4", "--max-new-tokens", "5", "--lora-rank", "2",
            "--checkpoint-dir", str(ckpt), "--json"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["steps"] == 3 and summary["resumed_from"] is None
    assert (ckpt / "policy" / "adapter_config.json").is_file()
    assert len((ckpt / "metrics.jsonl").read_text().splitlines()) == 3
    assert main(args[:-1] + ["--steps", "4", "--json"]) == 0  # the same run, one more step: resumes
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["resumed_from"] == 3

    plot = tmp_path / "frontier.png"
    code = main(["compare", "hello", "--model", model_dir, "--reward", "sentiment", "--beta", "1",
                 "--methods", "is,bon", "-n", "4", "--max-new-tokens", "5", "--option", "bon.best_of=2",
                 "--policy", f"dpg={ckpt / 'policy'}", "--plot", str(plot), "--json"])  # fmt: skip
    assert code == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["name"] for l in lines[:-1]] == ["is", "bon", "dpg"] and lines[-1]["summary"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_exit_2(model_dir, capsys):
    assert main(["train", "hi", "--model", model_dir, "--beta", "0", "--out", "/tmp/never", "--quiet"]) == 2
    assert "beta must be a finite number > 0, got 0.0" in capsys.readouterr().err
    assert main(["compare", "hi", "--model", model_dir, "--methods", "nope", "-n", "2", "--quiet"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_cli_compare_bounds_takes_max_draws_and_shows_progress_on_stderr(model_dir, capsys):
    """compare --bounds was silent for minutes and had no way to raise the exact samples' max_draws
    that its error asked for. Progress goes to stderr, so --json stays strict JSON on stdout."""
    args = ["compare", "hello", "--model", model_dir, "--reward", "sentiment", "--beta", "1", "--methods", "is",
            "-n", "4", "--max-new-tokens", "4", "--bounds", "--bounds-repeats", "3", "--json"]  # fmt: skip
    assert main(args + ["--bounds-max-draws", "5000"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]  # every stdout line is JSON
    assert lines[0]["name"] == "is" and lines[0]["log_Z_bracket"] is not None
    assert "compare brackets" in err and "bounds is" in err
    assert main(args + ["--bounds-max-draws", "1"]) != 0
    assert "--bounds-max-draws" in capsys.readouterr().err
    assert main(args[:-4] + ["--bounds-max-draws", "10", "--quiet"]) == 2  # without --bounds it has no use
    assert "needs --bounds" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening2.py (issue 19, hardening round two); each test is named after the failure it pins down
# --------------------------------------------------------------------------------------------------
T = 3  # two_token_prior at max_new_tokens=3: 15 continuations


def count_a(scale: float = 1.0):
    return Callable(lambda ts: [scale * t.count("a") for t in ts], name="count_a")


def test_consistency_one_validator_module_compare_refuses_empty_methods_non_policies_and_best_of_above_n():
    """methods=[] gave an empty table; policies={'x': 3} an AttributeError; best_of=8 with n=4
    silently decoded 8 sequences per prompt where every other row decoded 4."""
    post = pst.Posterior(two_token_prior(), count_a(), beta=1.0)
    with pytest.raises(ValueError, match="nothing to compare"):
        pst.compare(post, methods=[], n=4, max_new_tokens=T)
    with pytest.raises(ValueError, match=r"policies\['x'\] must be a policy .*got int"):
        pst.compare(post, methods=["is"], policies={"x": 3}, n=4, max_new_tokens=T)
    with pytest.raises(ValueError, match=r"method 'bon': best_of=8 exceeds n=4"):
        pst.compare(post, methods=["is", "bon"], n=4, max_new_tokens=T, method_options={"bon": {"best_of": 8}})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        pst.compare(post, methods=["is", "nope"], n=4, max_new_tokens=T)
    rep = pst.compare(post, methods="is", n=4, max_new_tokens=T)  # one name, not the letters of it
    assert [r["name"] for r in rep.rows] == ["is"]
