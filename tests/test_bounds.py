"""Two-sided bounds (bidirectional Monte Carlo) against enumerated posteriors."""

import math

import pytest
import torch

import posterior as pst
from posterior.compare import ComparisonReport
from posterior.exact import exact_posterior
from posterior.testing import markov_prior, two_token_prior

T = 3


def count_a(texts):
    return [float(t.count("a")) for t in texts]


def reward(upper_bound=float(T)):
    return pst.rewards.Callable(count_a, name="count_a", upper_bound=upper_bound)


@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize("prior", [two_token_prior(), markov_prior(seed=3)], ids=["two_token", "markov"])
def test_is_sides_bracket_the_exact_log_Z_over_seeds(prior, beta):
    post = pst.Posterior(prior, reward(), beta=beta)
    exact = exact_posterior(prior, post.reward, beta, T)
    b = pst.bounds(post, n=4, repeats=400, max_new_tokens=T, method="is", seed=1)
    lo, up = b.log_Z_lower.item(), b.log_Z_upper.item()
    # E[lower] <= log Z <= E[upper], each within 3 standard errors
    assert lo - 3 * b.log_Z_lower_se.item() <= exact.log_Z <= up + 3 * b.log_Z_upper_se.item()
    # the sides are genuinely on their sides here (n = 4 is far from the limit)
    assert lo < exact.log_Z < up
    assert b.kl_prior[0, 0].item() <= exact.kl <= b.kl_prior[0, 1].item()


def test_is_gap_shrinks_as_n_grows():
    post = pst.Posterior(markov_prior(seed=3), reward(), beta=0.5)
    gaps = [pst.bounds(post, n=n, repeats=100, max_new_tokens=T, method="is", seed=2).gap.item() for n in (2, 16, 128)]
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gaps[2] < 0.1 * gaps[0]


def test_a_constant_reward_closes_the_bracket_exactly():
    """q = pi0 = pi*: every weight equals exp(c/beta), both sides are log Z = c/beta exactly."""
    post = pst.Posterior(two_token_prior(), pst.rewards.Callable(lambda ts: [1.0] * len(ts), upper_bound=1.0), beta=0.25)
    b = pst.bounds(post, n=3, repeats=5, max_new_tokens=T, method="is", seed=0)
    assert b.log_Z_lower.item() == pytest.approx(4.0, abs=1e-12)
    assert b.log_Z_upper.item() == pytest.approx(4.0, abs=1e-12)
    assert b.kl_prior[0].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)


def test_policy_kl_brackets_contain_the_exact_kls():
    prior = markov_prior(seed=3)
    post = pst.Posterior(prior, reward(), beta=0.5)
    exact = exact_posterior(prior, post.reward, 0.5, T)
    q = markov_prior(seed=7)  # another model over the same tokens
    exact_q = exact_posterior(q, pst.rewards.Callable(lambda ts: [0.0] * len(ts)), 1.0, T)  # q's own distribution
    lq = dict(zip(exact_q.sequences, exact_q.log_prior.tolist()))
    lp = dict(zip(exact.sequences, exact.log_posterior.tolist()))
    kl_fwd = sum(math.exp(lp[s]) * (lp[s] - lq[s]) for s in lp)
    kl_rev = sum(math.exp(lq[s]) * (lq[s] - lp[s]) for s in lq)
    b = pst.bounds(post, n=8, repeats=200, max_new_tokens=T, method="is", policy=q, seed=4)
    assert b.kl_target_forward[0, 0].item() <= kl_fwd <= b.kl_target_forward[0, 1].item()
    assert b.kl_target_reverse[0, 0].item() <= kl_rev <= b.kl_target_reverse[0, 1].item()
    assert b.kl_prior[0, 0].item() <= exact.kl <= b.kl_prior[0, 1].item()


def test_without_an_upper_bound_only_the_lower_side_is_given_and_said():
    post = pst.Posterior(two_token_prior(), pst.rewards.Callable(count_a), beta=0.5)
    b = pst.bounds(post, n=4, repeats=4, max_new_tokens=T, method="is")
    assert b.log_Z_upper is None and b.kl_prior is None
    assert "declares no upper bound" in b.format_summary()


def test_rejection_cost_is_reported_per_exact_sample():
    post = pst.Posterior(two_token_prior(), reward(), beta=0.5)
    b = pst.bounds(post, n=2, repeats=50, max_new_tokens=T, method="is", seed=0)
    # acceptance probability is Z exp(-R/beta): draws per sample about exp(R/beta)/Z
    expected = math.exp(T / 0.5 - exact_posterior(post.prior, post.reward, 0.5, T).log_Z)
    assert b.exact_draws_per_sample.item() == pytest.approx(expected, rel=0.35)
    assert "prior draws each" in b.format_summary()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"repeats": 1}, "repeats"),
        ({"n": 0}, "n"),
        ({"method": "bon"}, "method"),
        ({"z": -1.0}, "z"),
        ({"policy": 3}, "policy"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kw, match):
    post = pst.Posterior(two_token_prior(), reward(), beta=0.5)
    args = {"n": 2, "repeats": 2, "max_new_tokens": T, "method": "is", **kw}
    with pytest.raises(ValueError, match=match):
        pst.bounds(post, **args)


def test_compare_with_bounds_brackets_every_row_and_contains_the_exact_values(tmp_path):
    from posterior.train.policy import policy_from

    prior = markov_prior(seed=3)
    post = pst.Posterior(prior, reward(), beta=0.5)
    exact = exact_posterior(prior, post.reward, 0.5, T)
    policy = policy_from(prior, max_new_tokens=T)  # tabular, at pi0: its KLs are exact by enumeration
    rep = pst.compare(post, methods=["is", "bon", "rejection"], policies={"q": policy}, n=16, max_new_tokens=T,
                      seed=0, bounds=True, bounds_repeats=64)  # fmt: skip
    is_row, bon, rej, q = (rep.row(k) for k in ("is", "bon", "rejection", "q"))
    for row in (is_row, rej):
        lo, hi = row["kl_prior_bracket"]
        assert lo <= exact.kl <= hi
        assert row["log_Z_bracket"][0] <= exact.log_Z <= row["log_Z_bracket"][1]
    assert rej["bracket_from"] == "is"
    assert bon["kl_prior_bracket"] == [0.0, bon["kl_prior"]]
    lo, hi = q["kl_target_forward_bracket"]
    assert lo <= q["kl_target_forward"] <= hi  # q's row is exact (enumerable), the bracket estimated
    lo, hi = q["kl_target_reverse_bracket"]
    assert lo <= q["kl_target_reverse"] <= hi
    beta, U = rep.bound_line
    assert beta == 0.5 and U >= exact.log_Z
    assert not any(r.get("flag", "").startswith("above") for r in rep.rows)
    text = rep.format_table()
    assert "brackets [low, high]" in text and "KL(pi*|q)" in text
    assert rep.plot(tmp_path / "f.png").stat().st_size > 10_000


def test_a_point_above_the_bound_line_is_flagged_not_drawn_as_better_than_optimal():
    from posterior.compare.report import _flag_rows

    rows = [
        {"name": "ok", "kl_prior": 1.0, "reward_mean": 0.5, "reward_mean_se": 0.01, "bracket_z": 3.0,
         "kl_prior_bracket": [0.5, 1.5], "estimates": ["reward_mean", "kl_prior"]},
        {"name": "bad", "kl_prior": 0.2, "reward_mean": 2.0, "reward_mean_se": 0.01, "bracket_z": 3.0,
         "kl_prior_bracket": [0.1, 0.3], "estimates": ["reward_mean", "kl_prior"]},
    ]  # fmt: skip
    _flag_rows(rows, [], False, (0.5, 1.0), [])  # reward <= 0.5 (KL + 1)
    assert "flag" not in rows[0]
    assert rows[1]["flag"].startswith("above the bound line")


def test_cli_compare_with_bounds_prints_brackets(model_dir, capsys):
    import json

    from posterior.cli import main

    code = main(["compare", "hello", "--model", model_dir, "--reward", "sentiment", "--beta", "1", "--methods", "is,bon",
                 "-n", "4", "--max-new-tokens", "4", "--option", "bon.best_of=2", "--bounds", "--bounds-repeats", "3",
                 "--json", "--quiet"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    is_row = rows[0]
    lo, hi = is_row["kl_prior_bracket"]
    assert lo <= hi and is_row["log_Z_bracket"][0] <= is_row["log_Z_bracket"][1]
    assert rows[-1]["bound_line"]["beta"] == 1.0
    assert any("exact samples of pi*" in n for n in rows[-1]["notes"])


@pytest.mark.parametrize("twist", ["auto", None], ids=["twisted", "untwisted"])
def test_smc_sides_bracket_the_exact_log_Z(twist):
    prior = markov_prior(seed=3)
    post = pst.Posterior(prior, pst.rewards.Callable(count_a, accepts_prefixes=True, upper_bound=float(T)), beta=0.5)
    exact = exact_posterior(prior, post.reward, 0.5, T)
    b = pst.bounds(post, n=4, repeats=150, max_new_tokens=T, method="smc", seed=1, twist=twist)
    assert b.log_Z_lower.item() - 3 * b.log_Z_lower_se.item() <= exact.log_Z
    assert exact.log_Z <= b.log_Z_upper.item() + 3 * b.log_Z_upper_se.item()
    assert b.log_Z_lower.item() < b.log_Z_upper.item()
    assert b.kl_prior[0, 0].item() <= exact.kl <= b.kl_prior[0, 1].item()


def test_smc_gap_closes_with_the_optimal_twist():
    """With psi* and the tilted proposal every weight, the reference's included, is Z: both sides
    equal log Z in every run (to the float32 precision of the toy's log-probabilities)."""
    from test_twists import OptimalDenseTwist, score

    prior = markov_prior()
    reward = pst.rewards.Callable(score, accepts_prefixes=True, upper_bound=4.0)
    post = pst.Posterior(prior, reward, beta=2.0)  # rejection at R = 4 accepts often enough
    exact = exact_posterior(prior, reward, 2.0, 4)
    twist = OptimalDenseTwist(prior, reward, 2.0, 4)
    b = pst.bounds(post, n=4, repeats=3, max_new_tokens=4, method="smc", seed=0, twist=twist, proposal="tilted")
    assert b.log_Z_lower.item() == pytest.approx(exact.log_Z, abs=1e-6)
    assert b.log_Z_upper.item() == pytest.approx(exact.log_Z, abs=1e-6)
    assert abs(b.gap.item()) < 1e-6


# --------------------------------------------------------------------------------------------------
# Brackets say what they guarantee (issue 25.9) and survive hard constraints (issue 25.12)
# --------------------------------------------------------------------------------------------------
def _no_nan(b):
    for name in ("log_Z_lower", "log_Z_upper", "log_Z_lower_se", "log_Z_upper_se", "log_Z_lower_mean", "log_Z_upper_mean",
                 "kl_prior", "kl_target_forward", "kl_target_reverse"):  # fmt: skip
        x = getattr(b, name)
        assert x is None or not bool(torch.isnan(x).any()), name
    assert "nan" not in b.format_summary().lower()


def test_log_Z_lower_and_upper_are_widened_ends_that_cover_the_exact_log_Z_over_seeds():
    """As plain means the two sides missed log Z in 15 of 40 probe calls (they are estimates of
    bounds, and close together). The ends are now the means moved out by z standard errors, as the
    KL brackets' are: over 40 seeded calls on an enumerable toy they hold log Z in all but a few
    (each end holds with probability ~0.99 at repeats=8), while the means miss it often."""
    prior = markov_prior(seed=3)
    post = pst.Posterior(prior, reward(), beta=2.0)  # R/beta = 1.5: exact samples are cheap
    exact = exact_posterior(prior, post.reward, 2.0, T).log_Z
    ends_miss = means_miss = 0
    for seed in range(40):  # measured: the ends missed 1, the means 29
        b = pst.bounds(post, n=16, repeats=8, max_new_tokens=T, method="is", seed=seed)
        ends_miss += not (b.log_Z_lower.item() <= exact <= b.log_Z_upper.item())
        means_miss += not (b.log_Z_lower_mean.item() <= exact <= b.log_Z_upper_mean.item())
        assert b.log_Z_bracket[0].tolist() == [b.log_Z_lower.item(), b.log_Z_upper.item()]
        assert b.log_Z_lower.item() == pytest.approx(b.log_Z_lower_mean.item() - 3 * b.log_Z_lower_se.item())
    assert ends_miss <= 3, ends_miss  # binomial(40, ~0.02): P(> 3) < 1%
    assert means_miss >= 10, means_miss  # so the test can fail: the means alone are not ends


def test_bounds_with_repeats_2_say_they_are_not_reliable():
    post = pst.Posterior(two_token_prior(), reward(), beta=0.5)
    b = pst.bounds(post, n=2, repeats=2, max_new_tokens=T, method="is", seed=0)
    assert not b.reliable and b.coverage == pytest.approx(0.5 + math.atan(3.0) / math.pi, abs=1e-9)  # Cauchy: t with 1 dof
    assert "NOT RELIABLE" in b.format_summary() and any("not reliable: with repeats=2" in n for n in b.notes)
    b8 = pst.bounds(post, n=2, repeats=8, max_new_tokens=T, method="is", seed=0)
    assert b8.reliable and "NOT RELIABLE" not in b8.format_summary()


def test_bounds_take_max_draws_for_their_exact_samples():
    """The rejection error told users to raise max_draws, which bounds did not take."""
    post = pst.Posterior(two_token_prior(), reward(), beta=0.1)  # R/beta = 30: acceptance ~ e^-15, hopeless
    with pytest.raises(pst.DegenerateWeightsError, match=r"max_draws=50.*bounds max_draws=") as e:
        pst.bounds(post, n=2, repeats=4, max_new_tokens=T, method="is", seed=0, max_draws=50)
    assert "rejection" in str(e.value)
    easy = pst.Posterior(two_token_prior(), reward(), beta=2.0)
    b = pst.bounds(easy, n=2, repeats=4, max_new_tokens=T, method="is", seed=0, max_draws=10_000)
    assert b.log_Z_upper is not None
    with pytest.raises(ValueError, match="max_draws"):
        pst.bounds(easy, n=2, repeats=4, max_new_tokens=T, method="is", max_draws=0)


def test_exact_samples_drawn_at_another_beta_are_refused():
    prior = two_token_prior()
    other = pst.Posterior(prior, reward(), beta=2.0).sample(n=4, method="rejection", max_new_tokens=T, seed=0)
    post = pst.Posterior(prior, reward(), beta=0.5)
    with pytest.raises(ValueError, match=r"beta=2\.0.*beta=0\.5"):
        pst.bounds(post, n=2, repeats=4, max_new_tokens=T, method="is", exact_samples=other)


def _constraint_post():
    """Contains("b") (0 / -inf, upper bound 0) on the two-token toy: a run of 2 samples loses both
    with probability 0.55^2 ~ 0.3 at max_new_tokens=2."""
    return pst.Posterior(two_token_prior(), pst.rewards.Contains("b"), beta=1.0)


@pytest.mark.parametrize("method", ["smc", "is"])
def test_bounds_keep_repeats_that_lost_every_sample_and_give_no_nan(method):
    """SMC raised DegenerateWeightsError as soon as one repeat lost every particle (the whole call
    failed); IS gave log_Z_lower -inf with a NaN standard error and a KL bracket [x, NaN]."""
    post = _constraint_post()
    exact = exact_posterior(post.prior, post.reward, 1.0, 2)
    b = pst.bounds(post, n=2, repeats=8, max_new_tokens=2, method=method, seed=0)
    assert int(b.degenerate_repeats[0]) > 0
    assert b.log_Z_lower.item() == -math.inf and b.log_Z_lower_mean.item() == -math.inf
    assert b.log_Z_upper.item() >= exact.log_Z  # the upper side's runs hold an exact sample: never degenerate
    assert b.kl_prior[0, 1].item() == math.inf and b.kl_prior[0, 0].item() <= exact.kl
    _no_nan(b)
    assert f"{int(b.degenerate_repeats[0])} of 8 lower-side repeats lost every sample" in b.format_summary()
    assert any("tilted" in n for n in b.notes)


def test_bounds_with_a_policy_on_a_hard_constraint_give_no_nan():
    from posterior.train.policy import policy_from

    post = _constraint_post()
    policy = policy_from(post.prior, max_new_tokens=2)  # tabular at pi0: it draws outside the support too
    b = pst.bounds(post, n=2, repeats=8, max_new_tokens=2, method="is", seed=0, policy=policy)
    _no_nan(b)
    assert b.kl_target_reverse[0].tolist() == [math.inf, math.inf]  # q puts mass where pi* has none: KL(q||pi*) = inf


def test_smc_bounds_on_a_hard_constraint_cover_the_exact_log_Z_when_no_run_dies():
    """With the tilted proposal and lookahead = V no particle ever dies (the constraint is read at
    the ending token), so both ends are finite and hold log Z."""
    post = pst.Posterior(two_token_prior(), pst.rewards.Contains("b"), beta=1.0)
    exact = exact_posterior(post.prior, post.reward, 1.0, 3).log_Z
    b = pst.bounds(post, n=4, repeats=8, max_new_tokens=3, method="smc", seed=0, proposal="tilted", lookahead=3)
    assert int(b.degenerate_repeats[0]) == 0
    assert b.log_Z_lower.item() <= exact <= b.log_Z_upper.item()


def test_compare_bounds_on_a_hard_constraint_never_fails_and_has_no_nan(capsys):
    post = _constraint_post()
    rep = pst.compare(post, methods=["is", "smc"], n=2, max_new_tokens=2, seed=0, bounds=True, bounds_repeats=8,
                      bounds_max_draws=1000, progress=True)  # fmt: skip
    for name in ("is", "smc"):
        row = rep.row(name)
        assert not any(isinstance(v, float) and math.isnan(v) for v in row["log_Z_bracket"] + row["kl_prior_bracket"])
    assert any("lost every sample" in n for n in rep.notes)
    assert "nan" not in rep.format_table().lower()
    assert "compare brackets" in capsys.readouterr().err  # progress on stderr


def test_an_estimate_outside_its_own_bracket_is_explained_in_the_output():
    """The README's SMC row printed KL 3.04 beside the bracket [3.14, 9.41] without a word."""
    from posterior.compare.report import _explain_outside

    row = {"name": "smc", "kind": "sampler", "reward_mean": 0.5, "kl_prior": 3.04, "kl_target_forward": None,
           "kl_target_reverse": None, "log_Z": -1.0, "distinct_2": None, "seconds": 1.0, "forward_tokens": 1,
           "estimates": ["reward_mean", "kl_prior", "log_Z"], "kl_prior_bracket": [3.14, 9.41],
           "log_Z_bracket": [-2.0, 0.0], "bracket_z": 3.0}  # fmt: skip
    _explain_outside(row, type("B", (), {"repeats": 8})())
    assert row["outside_bracket"] == ["KL(.|pi0) estimate 3.040 below [3.140, 9.410]: one run's estimate; the bracket rests on 8 repeats of each side"]
    rep = ComparisonReport(beta=1.0, reward="r", prompts=None, n=4, max_new_tokens=2, rows=[row], frontier=[], frontier_exact=True)
    assert "KL(.|pi0) estimate 3.040 below [3.140, 9.410]" in rep.format_table()
