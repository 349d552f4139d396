"""``pst.overoptimization`` on an enumerable toy: every column against the exact values of pi*_beta
(and of best-of-k) computed by enumeration; the pooled estimators against brute force; Gao et
al.'s fits recovering known (alpha, b); the report, plot and CLI."""

import importlib.util
import itertools
import json
import math

import numpy as np
import pytest
import torch

import posterior as pst
from posterior.cli import main
from posterior.exact import exact_posterior
from posterior.overopt import (
    ROW_KEYS, OveroptReport, best_of_for_kl, exact_best_of, fit_gao, gao_curve, gao_peak, kl_bound, pooled_best_of,
)  # fmt: skip
from posterior.testing import markov_prior

needs_textblob = pytest.mark.skipif(importlib.util.find_spec("textblob") is None, reason="the textblob extra is not installed")
M = 4  # max_new_tokens: 1 + 3 + 9 + 27 + 81 sequences over {a, b, c} (with EOS)
BETAS = [4.0, 2.0, 1.0, 0.7, 0.5, 0.35]


pytestmark = pytest.mark.usefixtures("one_thread")


def proxy_fn(texts):
    """Counts a's: optimising it drives every text to 'aaaa'."""
    return [float(t.count("a")) for t in texts]


def gold_fn(texts):
    """Likes one or two a's, dislikes more: it rises, then falls as the proxy is pushed."""
    return [1.2 * t.count("a") - 0.35 * t.count("a") ** 2 + 0.3 * t.count("b") for t in texts]


PROXY = pst.rewards.Callable(proxy_fn, name="count_a", accepts_prefixes=True)  # a count: SMC twists with it
GOLD = pst.rewards.Callable(gold_fn, name="gold")


@pytest.fixture(scope="module")
def prior():
    return markov_prior(seed=3)


def exact_values(prior, beta):
    """(E[r], E[g], KL(pi*||pi0)) of pi*_beta, from posterior.exact directly."""
    ex = exact_posterior(prior, PROXY, beta, M)
    p = ex.log_posterior.exp()
    g = torch.tensor(gold_fn(ex.texts), dtype=torch.float64)
    return float((p * ex.rewards).sum()), float((p * g).sum()), ex.kl


@pytest.fixture(scope="module")
def report(prior):
    return pst.overoptimization(prior, PROXY, GOLD, betas=BETAS, methods=["is", "smc", "bon"], n=4000,
                                smc_n=1000, max_new_tokens=M, seed=0, exact=True)  # fmt: skip


def test_is_exported_and_rows_have_every_key(report):
    assert pst.overoptimization is pst.overopt.overoptimization
    assert isinstance(report, OveroptReport)
    assert [r["method"] for r in report.rows] == ["is"] * 6 + ["bon"] * 6 + ["smc"] * 6 + ["exact"] * 6 + ["bon-exact"] * 6
    for r in report.rows:
        assert set(ROW_KEYS) <= set(r), r["method"]
        assert r["kl_prior_bracket"] is None  # until two-sided KL bounds exist (issue 16)


def test_exact_rows_equal_the_enumerated_posterior_to_1e_9(prior, report):
    for row, beta in zip(report.rows_of("exact"), BETAS):
        pr, gr, kl = exact_values(prior, beta)
        assert row["beta"] == beta and row["estimates"] == []
        assert abs(row["proxy_reward"] - pr) < 1e-9 and abs(row["gold_reward"] - gr) < 1e-9 and abs(row["kl_prior"] - kl) < 1e-9


def test_pooled_is_columns_within_3_sigma_of_the_exact_values_at_every_beta(prior, report):
    for row, beta in zip(report.rows_of("is"), BETAS):
        pr, gr, kl = exact_values(prior, beta)
        assert row["ess"] > 20, (beta, row["ess"])  # the delta-method SE is asymptotic: keep the ESS large
        for key, want in (("proxy_reward", pr), ("gold_reward", gr), ("kl_prior", kl)):
            se = row[f"{key}_se"]
            assert 0 < se < 0.3, (beta, key, se)  # not so wide that the check says nothing
            assert abs(row[key] - want) <= 3 * se, (beta, key, row[key], want, se)


def test_pooled_best_of_within_3_sigma_of_the_exact_best_of_k_law(report):
    for row, ex in zip(report.rows_of("bon"), report.rows_of("bon-exact")):
        assert row["best_of"] == ex["best_of"] and row["kl_prior"] == kl_bound(row["best_of"])
        assert ex["kl_prior"] <= ex["kl_prior_bound"] + 1e-12  # log k - (k-1)/k bounds the true KL
        for key in ("proxy_reward", "gold_reward"):
            assert abs(row[key] - ex[key]) <= 3 * row[f"{key}_se"], (row["best_of"], key, row[key], ex[key])


def test_best_of_k_matches_each_betas_exact_kl(report):
    for row, ex in zip(report.rows_of("bon"), report.rows_of("exact")):
        k = row["best_of"]
        assert row["kl_matched"] == ex["kl_prior"]
        assert abs(kl_bound(k) - ex["kl_prior"]) <= min(abs(kl_bound(j) - ex["kl_prior"]) for j in (k - 1, k + 1) if j >= 1)


def test_smc_rows_near_the_exact_values(prior, report):
    """SMC has no standard error (resampling): a tolerance of 5 sd / sqrt(ESS) of pi*_beta's own
    spread, from the exact posterior."""
    for row, beta in zip(report.rows_of("smc"), BETAS):
        ex = exact_posterior(prior, PROXY, beta, M)
        p = ex.log_posterior.exp()
        g = torch.tensor(gold_fn(ex.texts), dtype=torch.float64)
        for key, f in (("proxy_reward", ex.rewards), ("gold_reward", g)):
            sd = float((p * (f - (p * f).sum()) ** 2).sum().sqrt())
            assert abs(row[key] - float((p * f).sum())) <= 5 * sd / math.sqrt(row["ess"]) + 1e-9, (beta, key)
        assert abs(row["kl_prior"] - ex.kl) <= 0.1 * max(ex.kl, 1.0), (beta, row["kl_prior"], ex.kl)


def test_gold_overoptimises_on_the_toy_and_the_fits_find_a_peak(report):
    gold = [r["gold_reward"] for r in report.rows_of("exact")]
    assert max(gold) > gold[-1] + 0.5  # gold falls once beta is small: the toy overoptimises
    for method in ("is", "bon", "exact", "bon-exact"):
        fit = report.fits[method]
        assert fit["form"] == ("bon" if method.startswith("bon") else "rl") and fit["points"] == 6
        assert fit["kl_peak"] is not None and fit["b"] > 0


def test_prior_reference_from_the_pool_and_exact(prior, report):
    ex = exact_posterior(prior, PROXY, 1.0, M)
    p0 = ex.log_prior.exp()
    assert abs(report.prior_exact["proxy_reward"] - float((p0 * ex.rewards).sum())) < 1e-12
    assert abs(report.prior["proxy_reward"] - report.prior_exact["proxy_reward"]) <= 3 * report.prior["proxy_reward_se"]


# --- the estimators against brute force --------------------------------------------------------
def brute_best_of(r, f, k, keep):
    vals = [f[max(S, key=lambda i: (r[i], -i))] for S in itertools.combinations(keep, k)]
    return sum(vals) / len(vals)


def test_pooled_best_of_is_the_u_statistic_over_all_subsets_with_jackknife_se():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 4, (2, 8), generator=g).double()  # ties: the first maximum wins, as in "bon"
    f = torch.randn(1, 2, 8, generator=g, dtype=torch.float64)
    for k in (1, 2, 3, 7):
        est = pooled_best_of(r, f, k)
        for p in range(2):
            rr, ff = r[p].tolist(), f[0, p].tolist()
            assert est.means[0, p].item() == pytest.approx(brute_best_of(rr, ff, k, range(8)), abs=1e-12)
            loo = [brute_best_of(rr, ff, k, [i for i in range(8) if i != j]) for j in range(8)]
            m = sum(loo) / 8
            assert est.means_se[0, p].item() == pytest.approx(math.sqrt(7 / 8 * sum((x - m) ** 2 for x in loo)), abs=1e-12)
            assert est.weights[p].sum().item() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="best_of must be an int in"):
        pooled_best_of(r, f, 8)


def test_exact_best_of_is_the_law_of_the_first_maximum_of_k_draws():
    lp = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).log()
    r = torch.tensor([1.0, 0.0, 1.0, 2.0], dtype=torch.float64)  # a tie at 1.0
    for k in (1, 2, 3, 5):
        want = torch.zeros(4, dtype=torch.float64)
        for t in itertools.product(range(4), repeat=k):
            best = max(range(k), key=lambda j: (r[t[j]].item(), -j))
            want[t[best]] += math.prod(lp.exp()[i].item() for i in t)
        assert torch.allclose(exact_best_of(lp, r, k).exp(), want, atol=1e-14)


def test_best_of_for_kl_inverts_the_bound():
    assert best_of_for_kl(0.0) == 1
    for k in (2, 3, 10, 100, 5000):
        assert best_of_for_kl(kl_bound(k)) == k
    assert best_of_for_kl(kl_bound(100), max_k=50) == 50
    with pytest.raises(ValueError, match="kl must be finite"):
        best_of_for_kl(-0.1)


# --- Gao et al.'s forms --------------------------------------------------------------------------
@pytest.mark.parametrize("form,alpha,b", [("bon", 1.3, 0.4), ("bon", 0.5, 0.05), ("rl", 0.8, 0.5), ("rl", 2.0, 0.9)])
def test_fits_recover_alpha_and_b_from_curves_with_known_values(form, alpha, b):
    d = np.linspace(0.0, 4.0, 15)
    fit = fit_gao(d, gao_curve(d, alpha, b, form), form)
    assert fit.alpha == pytest.approx(alpha, abs=1e-10) and fit.b == pytest.approx(b, abs=1e-10)
    want = alpha / (2 * b) if form == "bon" else math.exp(alpha / b - 1)
    assert fit.d_peak == pytest.approx(want, rel=1e-9) and fit.kl_peak == pytest.approx(want**2, rel=1e-9)
    # with noise of sd 0.01 on 200 points the estimates stay within a few hundredths
    rng = np.random.default_rng(0)
    dd = np.linspace(0.05, 4.0, 200)
    noisy = fit_gao(dd, gao_curve(dd, alpha, b, form) + rng.normal(0, 0.01, dd.shape), form)
    assert noisy.alpha == pytest.approx(alpha, abs=0.02) and noisy.b == pytest.approx(b, abs=0.02)


def test_gao_peak_is_the_maximum_of_the_curve():
    for form, alpha, b in (("bon", 1.0, 0.3), ("rl", 0.7, 0.4)):
        d = np.linspace(1e-6, 10, 200001)
        assert gao_peak(alpha, b, form) == pytest.approx(d[np.argmax(gao_curve(d, alpha, b, form))], abs=1e-4)
    assert gao_peak(1.0, -0.1, "bon") is None and gao_peak(1.0, 0.0, "rl") is None


def test_fit_needs_two_points_with_positive_kl():
    with pytest.raises(ValueError, match="at least two points"):
        fit_gao([0.0, 1.0], [0.0, 0.5], "rl")
    with pytest.raises(ValueError, match="form must be"):
        fit_gao([1.0, 2.0], [0.0, 0.5], "ppo")


# --- ensembles, policies, report -----------------------------------------------------------------
def test_ensemble_proxy_reports_member_means_and_disagreement(prior):
    a = pst.rewards.Callable(proxy_fn, name="a")
    b = pst.rewards.Callable(lambda ts: [0.5 * t.count("a") + t.count("b") for t in ts], name="b")
    ens = pst.rewards.Ensemble([a, b], "uwo", uwo_weight=0.5)
    rep = pst.overoptimization(prior, ens, GOLD, betas=[1.0, 0.5], methods=["is", "bon"], n=500, max_new_tokens=M)
    pool_rep = pst.overoptimization(prior, a, GOLD, betas=[1.0, 0.5], methods=["is"], n=500, max_new_tokens=M)
    for row in rep.rows:
        assert len(row["proxy_members"]) == 2 and row["proxy_member_std"] >= 0
    assert rep.prior["gold_reward"] == pool_rep.prior["gold_reward"]  # same seed: the same pool
    # uwo's value is the members' mean minus 0.5 * their variance; with one pool the IS means agree
    is_rows = rep.rows_of("is")
    assert all(r["proxy_reward"] <= sum(r["proxy_members"]) / 2 + 1e-12 for r in is_rows)


def test_untrained_policy_row_is_the_prior(prior):
    policy = pst.train.policy_from(prior, max_new_tokens=M)
    rep = pst.overoptimization(prior, PROXY, GOLD, betas=[1.0], methods=["is"], policies={"pi0": policy}, n=3000,
                               max_new_tokens=M, exact=True)  # fmt: skip
    row = rep.rows_of("policy")[0]
    assert row["name"] == "pi0" and row["beta"] is None
    assert abs(row["kl_prior"]) < 1e-5  # log q - log pi0 of the same model
    for key in ("proxy_reward", "gold_reward"):
        assert abs(row[key] - rep.prior_exact[key]) <= 3 * row[f"{key}_se"], key


def test_report_json_table_and_plot(report, tmp_path):
    js = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert len(js["rows"]) == len(report.rows) and set(js["fits"]) == {"is", "bon", "smc", "exact", "bon-exact"}
    text = report.format_table()
    assert "fit is (rl)" in text and "fit bon (bon)" in text and "KL" in text
    path = report.plot(tmp_path / "sub" / "overopt.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


@pytest.mark.parametrize("kw,match", [
    ({"betas": []}, "betas must be a non-empty list"), ({"betas": [1.0, -0.5]}, "every beta must be .* -0.5"),
    ({"betas": 0.5}, "betas must be"), ({"methods": ["is", "mh"]}, "methods must be distinct names"),
    ({"n": 1}, "n must be"), ({"smc_options": {"ess_threshold": 0.5}, "methods": ["is"]}, "'smc' is not in methods"),
    ({"proxy": "nope"}, "unknown reward 'nope'"), ({"gold": 3}, "gold: reward must be"),
])  # fmt: skip
def test_bad_input_names_the_value(prior, kw, match):
    args = {"proxy": PROXY, "gold": GOLD, "betas": [1.0], "methods": ["is"], "n": 10, "max_new_tokens": M, **kw}
    with pytest.raises(ValueError, match=match):
        pst.overoptimization(prior, **args)


def test_exact_needs_an_enumerable_prior(prior):
    from posterior.testing import SequencePrior

    with pytest.raises(ValueError, match="exact=True .* CallablePrior"):
        pst.overoptimization(SequencePrior(prior), PROXY, GOLD, betas=[1.0], n=4, max_new_tokens=2, exact=True)


@needs_textblob
def test_specs_are_accepted_for_proxy_and_gold(prior):
    rep = pst.overoptimization(prior, "ensemble:mean:afinn,sentiment", "textblob", betas=[1.0, 0.5], methods=["is"], n=20,
                               max_new_tokens=2)  # fmt: skip
    assert rep.proxy.startswith("Ensemble(mean") and rep.gold == "TextBlob()"


# --- command line ----------------------------------------------------------------------------------
@needs_textblob
def test_cli_overopt_json_and_plot(model_dir, tmp_path, capsys):
    plot = tmp_path / "o.png"
    code = main(["overopt", "hello", "--model", model_dir, "--proxy", "ensemble:uwo:0.5:sentiment,textblob",
                 "--gold", "afinn", "--betas", "0.5,1,2", "--methods", "is,smc,bon", "-n", "8", "--max-new-tokens", "4",
                 "--plot", str(plot), "--json", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and plot.exists()
    rows = [json.loads(line) for line in out]
    assert [r.get("method") for r in rows[:-1]] == ["is"] * 3 + ["bon"] * 3 + ["smc"] * 3
    assert rows[-1]["summary"] is True and rows[-1]["plot"] == str(plot) and "fits" in rows[-1]


@pytest.mark.parametrize("argv,match", [
    (["--betas", "0.1,-1"], "--betas"), (["--methods", "is,mh"], "unknown method 'mh'"),
    (["--proxy", "nope"], "--proxy: unknown reward 'nope'"), (["--gold", "ensemble:mean:afinn,zzz"], "member 'zzz'"),
    (["--smc-option", "ess_threshold=0.5", "--methods", "is"], "smc is not in --methods"),
    (["--smc-option", "nope=1"], "no option"), (["-n", "1"], "n must be"),
])  # fmt: skip
def test_cli_bad_input_exits_2_before_the_model_loads(argv, match, capsys, model_dir, monkeypatch):
    from posterior.cli import options

    monkeypatch.setattr(options, "load_prior", lambda args: pytest.fail("the model loaded before the bad input was seen"))
    try:
        code = main(["overopt", "hi", "--model", model_dir, "--quiet", *argv])
    except SystemExit as e:  # argparse's own errors (an option's type) exit from the parser
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and (match in err or __import__("re").search(match, err)), err


@pytest.mark.slow
def test_default_model_sweep_is_smc_bon(tmp_path):
    prior = pst.load_default_prior()
    rep = pst.overoptimization(prior, "sentiment", "afinn", betas=[0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
                               methods=["is", "smc", "bon"], n=16, smc_n=8, max_new_tokens=8,
                               prompts=["The movie was"])  # fmt: skip
    assert len(rep.rows) == 18 and set(rep.fits) == {"is", "smc", "bon"}
    is_rows = rep.rows_of("is")
    assert is_rows[0]["proxy_reward"] >= is_rows[-1]["proxy_reward"]  # smaller beta: more proxy reward
    assert rep.plot(tmp_path / "p.png").exists()


def test_a_second_sweep_reuses_the_pool_of_the_first(prior):
    first = pst.overoptimization(prior, PROXY, GOLD, betas=[1.0, 0.5], methods=["is", "bon"], n=300, max_new_tokens=M)
    again = pst.overoptimization(prior, PROXY, GOLD, betas=[1.0, 0.5], methods=["is", "bon"], n=300, max_new_tokens=M,
                                 seed=7, draws=first.draws)  # fmt: skip
    assert again.pool["reused"] and again.draws is first.draws
    assert [r["proxy_reward"] for r in again.rows] == [r["proxy_reward"] for r in first.rows]
    with pytest.raises(ValueError, match=r"this sweep needs \(1, 200\)"):
        pst.overoptimization(prior, PROXY, GOLD, betas=[1.0], methods=["is"], n=200, max_new_tokens=M, draws=first.draws)


def test_a_pool_drawn_from_another_prior_is_refused(prior):
    """``draws=`` took any Continuations of the right shape: a pool of another prior (even another
    vocabulary) was reweighted as if drawn from this one, a silently wrong sweep (issue 25 item 5).
    The pool now records what it was drawn from and a mismatch is refused, naming it."""
    from posterior.priors.callable import CallablePrior

    kw = dict(betas=[1.0], methods=["is"], n=50, max_new_tokens=M)
    first = pst.overoptimization(prior, PROXY, GOLD, **kw)
    same = markov_prior(seed=3)  # another object with the same next-token law: the same prior
    assert pst.overoptimization(same, PROXY, GOLD, draws=first.draws, **kw).pool["reused"]
    other_vocab = markov_prior(vocab=("a", "b", "d", "<eos>"), seed=3)  # same law, other tokens
    other_law = markov_prior(seed=4)
    hotter = CallablePrior(prior.vocab, prior.next_logprobs, temperature=2.0)
    for other, field in ((other_vocab, "fingerprint"), (other_law, "fingerprint"), (hotter, "describe")):
        with pytest.raises(ValueError, match=f"draws were drawn from another prior: its {field} is"):
            pst.overoptimization(other, PROXY, GOLD, draws=first.draws, **kw)
    with pytest.raises(ValueError, match=r"draws were drawn with prompts=None; this sweep has prompts=\['a'\]"):
        pst.overoptimization(prior, PROXY, GOLD, draws=first.draws, prompts=["a"], **kw)
    with pytest.raises(ValueError, match=f"draws were drawn with max_new_tokens={M}; this sweep has max_new_tokens={M + 1}"):
        pst.overoptimization(prior, PROXY, GOLD, draws=first.draws, **{**kw, "max_new_tokens": M + 1})
    plain = prior.sample(prior.encode_prompts(None), 50, M, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="these Continuations record nothing"):
        pst.overoptimization(prior, PROXY, GOLD, draws=plain, **kw)


def test_a_pool_of_other_weights_is_refused_on_hf_priors():
    from posterior.testing import tiny_hf_prior

    kw = dict(betas=[1.0], methods=["is"], n=4, max_new_tokens=3, prompts=["ab"])
    first = pst.overoptimization(tiny_hf_prior("gpt2", seed=0), PROXY, GOLD, **kw)
    assert pst.overoptimization(tiny_hf_prior("gpt2", seed=0), PROXY, GOLD, draws=first.draws, **kw).pool["reused"]
    with pytest.raises(ValueError, match="draws were drawn from another prior: its fingerprint is 'weights "):
        pst.overoptimization(tiny_hf_prior("gpt2", seed=1), PROXY, GOLD, draws=first.draws, **kw)


def test_two_prompts_average_their_exact_values(prior):
    prompts = ["a", "c"]
    rep = pst.overoptimization(prior, PROXY, GOLD, betas=[1.0, 0.5], methods=["is"], n=3000, max_new_tokens=3,
                               prompts=prompts, exact=True)  # fmt: skip
    for row, ex_row in zip(rep.rows_of("is"), rep.rows_of("exact")):
        want = []
        for p in prompts:
            ex = exact_posterior(prior, PROXY, row["beta"], 3, p)
            q = ex.log_posterior.exp()
            want.append((float((q * ex.rewards).sum()), float((q * torch.tensor(gold_fn(ex.texts), dtype=torch.float64)).sum()), ex.kl))
        for j, key in enumerate(("proxy_reward", "gold_reward", "kl_prior")):
            mean = sum(w[j] for w in want) / 2
            assert abs(ex_row[key] - mean) < 1e-9
            assert abs(row[key] - mean) <= 3 * row[f"{key}_se"], (row["beta"], key)
