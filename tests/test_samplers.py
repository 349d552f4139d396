"""Every foundation sampler against an enumerated posterior (fixed seeds, derived tolerances)."""

import itertools
import json
import math

import pytest
import torch

import posterior as pst
from posterior.exact import empirical, exact_posterior, sequence_keys, total_variation
from posterior.samplers.rejection import qrs_estimates
from posterior.testing import markov_prior, two_token_prior

from conftest import tv_tolerance, tv_to_exact

BETA = 0.5
T = 3  # max_new_tokens: two_token_prior then has 15 continuations


def count_a(texts):
    return [float(t.count("a")) for t in texts]


@pytest.fixture
def post():
    return pst.Posterior(two_token_prior(), pst.rewards.Callable(count_a), beta=BETA)


@pytest.fixture
def exact(post):
    return exact_posterior(post.prior, post.reward, BETA, T)


def test_importance_sampling_matches_enumerated_posterior(post, exact):
    n = 20_000
    res = post.sample(n=n, method="is", max_new_tokens=T, seed=1)
    assert torch.allclose(torch.logsumexp(res.log_weights, -1), torch.zeros(1), atol=1e-5)
    assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), res.ess.item())
    assert abs(res.log_Z.item() - exact.log_Z) < 0.05
    # KL(pi*||pi0) = E_pi*[r]/beta - log Z, against the enumerated value.
    assert res.kl().item() == pytest.approx(exact.kl, abs=0.05)


def test_importance_sampling_with_another_proposal(post, exact):
    q = two_token_prior((0.2, 0.3, 0.5))
    res = post.sample(n=20_000, method="is", max_new_tokens=T, seed=2, proposal=q)
    assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), res.ess.item())
    assert abs(res.log_Z.item() - exact.log_Z) < 0.05
    assert res.ess.item() < 20_000 * 0.9  # a worse proposal shows in the ESS


def test_importance_sampling_with_a_proposal_equal_to_the_posterior_has_full_ess():
    """At beta -> the reward is constant 0, the posterior is the prior: log Z = 0, ESS = n."""
    post = pst.Posterior(two_token_prior(), pst.rewards.Callable(lambda ts: [0.0] * len(ts)), beta=1.0)
    res = post.sample(n=500, method="is", max_new_tokens=T, seed=0)
    assert res.ess.item() == pytest.approx(500.0)
    assert res.log_Z.item() == pytest.approx(0.0, abs=1e-6)


def test_rejection_sampling_is_exact(post, exact):
    n = 4000
    res = post.sample(n=n, method="rejection", max_new_tokens=T, seed=3, reward_upper_bound=3.0)
    assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), n)
    # (n-1)/(D-1) exp(R/beta) is unbiased for Z; relative sd about 1/sqrt(n).
    assert abs(res.log_Z.item() - exact.log_Z) < 4 / math.sqrt(n)
    assert 0 < res.info["acceptance_rate"].item() < 1


def test_qrs_with_a_bound_above_every_weight_is_exact(post, exact):
    n = 4000
    res = post.sample(n=n, method="qrs", max_new_tokens=T, seed=4, log_bound=3.0 / BETA)
    assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), n)
    assert abs(res.log_Z.item() - exact.log_Z) < 0.05
    assert res.info["tv_estimate"].item() < 1e-9


def test_qrs_with_a_low_bound_samples_min_qB_P_and_estimates_its_divergence(post, exact):
    """Below max w, QRS samples p_B ∝ min(q B, P) exactly; its TV estimate matches the exact TV."""
    log_B = 2.0 / BETA  # weights exp(r/beta) with r in 0..3: clipped for r = 3
    n = 4000
    res = post.sample(n=n, method="qrs", max_new_tokens=T, seed=5, log_bound=log_B, batch_size=4000)
    log_P = exact.log_prior + exact.rewards / BETA
    log_pB = torch.minimum(log_P, exact.log_prior + log_B)
    pB = (log_pB - torch.logsumexp(log_pB, 0)).exp()
    target = dict(zip(exact.sequences, pB.tolist()))
    keys = sequence_keys(res.tokens, res.lengths)[0]
    assert total_variation(empirical(keys), target) < tv_tolerance(target.values(), n)
    exact_tv = total_variation(target, exact.prob())
    assert exact_tv > 0.02  # the bound really truncates
    assert res.info["tv_estimate"].item() == pytest.approx(exact_tv, abs=0.02)
    # The same estimator on the exact expectation (weights = prior-weighted atoms) is exact.
    est = qrs_estimates(log_P - exact.log_prior, log_B)
    assert est["acceptance_rate"] > 0


def test_best_of_n_matches_its_exact_distribution(distinct_reward):
    k, n = 3, 12_000
    post = pst.Posterior(two_token_prior(), distinct_reward, beta=1.0)
    ex = exact_posterior(post.prior, distinct_reward, 1.0, T)
    p = ex.log_prior.exp()
    r = ex.rewards
    assert len(set(r.tolist())) == len(r)  # distinct rewards
    F = torch.stack([(p * (r < ri)).sum() for ri in r])  # pi0(r(X) < r(x))
    bon = ((F + p) ** k - F**k).tolist()
    assert sum(bon) == pytest.approx(1.0)
    res = post.sample(n=n, method="bon", max_new_tokens=T, seed=6, best_of=k)
    got = empirical(sequence_keys(res.tokens, res.lengths)[0])
    target = dict(zip(ex.sequences, bon))
    assert total_variation(got, target) < tv_tolerance(target.values(), n)
    assert res.log_Z is None and not res.targets_posterior


def test_soft_best_of_n_matches_its_exact_distribution(distinct_reward):
    k, n, beta = 3, 12_000, 0.2
    post = pst.Posterior(two_token_prior(), distinct_reward, beta=beta)
    ex = exact_posterior(post.prior, distinct_reward, beta, T)
    p, s = ex.log_prior.exp(), ex.rewards / beta
    # P(x) = k p(x) E[e^{s(x)} / (e^{s(x)} + sum of k-1 others)], enumerated over the others.
    S = len(p)
    probs = torch.zeros(S, dtype=torch.float64)
    for others in itertools.product(range(S), repeat=k - 1):
        po = math.prod(p[j].item() for j in others)
        so = sum(math.exp(s[j].item()) for j in others)
        probs += k * p * po * s.exp() / (s.exp() + so)
    assert probs.sum().item() == pytest.approx(1.0)
    res = post.sample(n=n, method="soft_bon", max_new_tokens=T, seed=7, best_of=k)
    got = empirical(sequence_keys(res.tokens, res.lengths)[0])
    target = dict(zip(ex.sequences, probs.tolist()))
    assert total_variation(got, target) < tv_tolerance(target.values(), n)


def test_many_prompts_are_sampled_independently_against_their_own_posteriors():
    prior = markov_prior(("a", "b", "<eos>"), seed=3)
    post = pst.Posterior(prior, pst.rewards.Callable(count_a), beta=1.0)
    prompts = ["a", "bb", "ab"]
    res = post.sample(n=20_000, method="is", max_new_tokens=3, prompts=prompts, seed=8)
    assert res.log_weights.shape == (3, 20_000)
    for i, prompt in enumerate(prompts):
        ex = exact_posterior(prior, post.reward, 1.0, 3, prompt=prompt)
        assert tv_to_exact(res, ex, prompt=i) < tv_tolerance(ex.prob().values(), res.ess[i].item())
        assert abs(res.log_Z[i].item() - ex.log_Z) < 0.05


def test_same_seed_same_samples_and_generator_is_honoured(post):
    a = post.sample(n=50, method="is", max_new_tokens=T, seed=11)
    b = post.sample(n=50, method="is", max_new_tokens=T, seed=11)
    c = post.sample(n=50, method="is", max_new_tokens=T, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, post.sample(n=50, method="is", max_new_tokens=T, seed=12).tokens)


def test_log_density_of_given_texts_matches_enumeration(post, exact):
    texts = ["ab", "", "ba"]
    got = post.log_density(texts)
    want = {t: lp + r / BETA for t, lp, r in zip(exact.texts, exact.log_prior.tolist(), exact.rewards.tolist())}
    assert got.tolist() == pytest.approx([want[t] for t in texts], abs=1e-6)


def test_result_summary_and_pyro(post):
    res = post.sample(n=64, method="is", max_new_tokens=T, seed=0)
    s = res.summary()
    assert set(s) >= {"reward_mean", "ess", "log_Z", "kl", "method"}
    (emp,) = res.to_pyro()
    assert emp.event_shape == res.tokens.shape[-1:]
    assert torch.allclose(emp.log_weights.logsumexp(0), torch.tensor(0.0), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The typed method interface: options in, infos out, the registry (issue 28, items 1-3)
# --------------------------------------------------------------------------------------------------
#: The option table as it was before the options became dataclasses: {method: {option: default}}.
OLD_DEFAULTS = {
    "is": {"proposal": None},
    "bon": {"best_of": 4},
    "soft_bon": {"best_of": 4},
    "rejection": {"reward_upper_bound": None, "batch_size": None, "max_draws": None},
    "qrs": {"log_bound": None, "proposal": None, "batch_size": None, "max_draws": None},
    "smc": {"ess_threshold": 0.5, "resampling": "systematic", "twist": "auto", "proposal": "bootstrap", "lookahead": 8,
            "block_size": 1, "decode_ahead": True, "check_twist": True, "return_ancestry": False, "callback": None,
            "reference": None},
    "mh": {"move": "suffix", "mixture_weight": 0.5, "steps": 16, "burn_in": None, "thin": 1, "init_texts": None,
           "callback": None, "return_chains": False, "samples": "final"},
    "pgibbs": {"particles": 16, "steps": 16, "burn_in": None, "ess_threshold": 0.5, "twist": "auto", "proposal": "bootstrap",
               "lookahead": 8, "block_size": 1, "decode_ahead": True, "check_twist": True, "callback": None},
}  # fmt: skip
ADDED = {"pgibbs": {"thin": 1}}  # options added since: particle Gibbs thins like MH (the shared chains loop)


def test_api_contract_options_for_and_typed_info(post):
    """The contract lines of /work/shared/API.md, "typed method interface", exactly."""
    import dataclasses

    O = pst.samplers.options_for("smc")  # a frozen, torch-free dataclass: defaults, checks, help
    assert dataclasses.is_dataclass(O) and O.__dataclass_params__.frozen
    assert O().ess_threshold == 0.5 and "ESS" in O.help()["ess_threshold"]
    with pytest.raises(ValueError, match=r"^ess_threshold must be a finite number in \[0, 1\], got 2.0$"):
        O(ess_threshold=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        O().ess_threshold = 0.1
    res = post.sample(n=8, method="smc", max_new_tokens=T, seed=0)
    res.info["ess"], list(res.info.keys())
    assert res.info["ess"] is res.info.ess and torch.equal(res.info["ess"], res.ess)
    assert list(res.info.keys())[:4] == ["proposal", "twist", "resampling", "block_size"] and "ess" in res.info.keys()
    with pytest.raises((dataclasses.FrozenInstanceError, TypeError)):
        res.info["ess"] = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.info.ess = None


def test_options_for_is_torch_free_and_every_method_has_one():
    import subprocess
    import sys

    code = ("import sys, posterior as pst\n"
            "for m in ('is', 'bon', 'soft_bon', 'rejection', 'qrs', 'smc', 'mh', 'pgibbs'):\n"
            "    pst.samplers.options_for(m)()\n"
            "assert 'torch' not in sys.modules, 'options_for imported torch'\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("method", sorted(OLD_DEFAULTS))
def test_options_for_defaults_equal_the_old_table_and_every_check_names_its_field(method):
    from posterior.cli.options import check_method_options
    from posterior.samplers.options import METHOD_OPTIONS, check_option

    O = pst.samplers.options_for(method)
    assert O.method == method and O.defaults() == {**OLD_DEFAULTS[method], **ADDED.get(method, {})}
    assert {k: o.default for k, o in METHOD_OPTIONS[method].items()} == O.defaults()  # the table is a view of the class
    assert pst.samplers.sampler_options(method) == O.defaults()
    assert all(O.help()[k] for k in O.defaults())  # every option has its one-line help
    for name, opt in O.table().items():
        if opt.python_object:
            continue
        bad = "foo" if name == "twist" else []  # a list is no number, bool, choice or int
        with pytest.raises(ValueError) as lib:
            O(**{name: bad})
        message = str(lib.value)
        assert message.startswith(f"{name} must be") and repr(bad) in message, message
        with pytest.raises(ValueError) as table:
            check_option(method, name, bad)
        assert str(table.value) == message
        with pytest.raises(ValueError) as cli:
            check_method_options(method, [(name, bad)])
        assert str(cli.value) == f"method {method!r} option {message} (--option {name}={json.dumps(bad)})"


@pytest.mark.parametrize("method, bad", [("smc", {"ess_threshold": 1.5}), ("mh", {"thin": 0}), ("pgibbs", {"particles": 1}),
                                         ("bon", {"best_of": 0}), ("qrs", {"max_draws": -3})])  # fmt: skip
def test_library_cli_and_options_class_refuse_a_value_with_the_same_message(post, method, bad):
    from posterior.cli.options import check_method_options

    [(name, value)] = bad.items()
    with pytest.raises(ValueError) as cls:
        pst.samplers.options_for(method)(**bad)
    with pytest.raises(ValueError) as lib:
        post.sample(n=2, method=method, max_new_tokens=T, **bad)
    with pytest.raises(ValueError) as cli:
        check_method_options(method, [(name, value)])
    assert str(lib.value) == str(cls.value) and str(cli.value).startswith(f"method {method!r} option {cls.value}")


def test_burn_in_is_checked_against_steps_by_the_chains_options():
    for method in ("mh", "pgibbs"):
        O = pst.samplers.options_for(method)
        with pytest.raises(ValueError, match=r"^burn_in must be < steps=4, got 4$"):
            O(steps=4, burn_in=4)
        assert O(steps=9).burn_in_steps == 4 and O(steps=8, burn_in=4, thin=2).kept == (6, 8)


INFO_FIELDS = {  # method, options, fields that must be set
    "is": ({}, ("proposal", "ess")),
    "bon": ({}, ("best_of", "kl_bound")),
    "soft_bon": ({}, ("best_of",)),
    "rejection": ({"reward_upper_bound": 3.0}, ("acceptance_rate", "draws", "max_draws", "acceptances")),
    "qrs": ({}, ("log_bound", "acceptance_rate", "tv_estimate", "kl_estimate", "draws", "max_draws")),
    "smc": ({}, ("proposal", "twist", "resampling", "block_size", "ess_per_step", "resampled", "log_Z_increments")),
    "mh": ({"steps": 8}, ("move", "steps", "burn_in", "thin", "acceptance_rate", "r_hat", "mcmc_ess", "reward_trace")),
    "pgibbs": ({"particles": 4, "steps": 8, "thin": 2}, ("particles", "steps", "thin", "r_hat", "moved", "restarts")),
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(INFO_FIELDS))
def test_typed_info_reads_by_field_and_by_key(post, method):
    import dataclasses

    from posterior.results import Info
    from posterior.samplers.registry import get_method

    options, names = INFO_FIELDS[method]
    res = post.sample(n=8, method=method, max_new_tokens=T, seed=0, **options)
    info = res.info
    assert type(info) is get_method(method).info and isinstance(info, Info) and dataclasses.is_dataclass(info)
    for name in names:
        assert name in info and name in info.keys() and info[name] is getattr(info, name) is info.get(name)
        assert getattr(info, name) is not None
    assert set(info.keys()) <= {f.name for f in dataclasses.fields(info)} and len(info) == len(list(info))
    assert "nope" not in info and info.get("nope", 7) == 7
    with pytest.raises(KeyError):
        info["nope"]
    assert dict(info.items()) == {k: info[k] for k in info}
    assert info.replace(extra_entry=1)["extra_entry"] == 1 and "extra_entry" not in info  # a new info; this one unchanged
    assert torch.equal(info.ess, res.ess)  # written once, by make_result
    res.summary(), res.format_summary()  # both read the typed info
    if method == "pgibbs":
        assert info.thin == 2 and info.reward_trace.shape == (1, 8)


def test_a_hand_built_info_keeps_its_entries_as_keys_and_attributes():
    from posterior.results import Info

    info = Info.of({"x": [1, 2], "degenerate": None, "runs": "r"})
    assert info.x == [1, 2] and info["x"] == [1, 2] and list(info) == ["runs", "x"] and "degenerate" not in info
    with pytest.raises(AttributeError, match="has no field 'y'"):
        info.y


def test_a_toy_registered_method_runs_end_to_end(post, exact):
    """A new method is one Method(name, options, info, run): here self-normalised importance
    sampling from the prior with a checked option, reached through Posterior.sample, the CLI's
    option checks and options_for, and exact on the enumerable toy."""
    from dataclasses import dataclass

    from posterior.cli.options import check_method_options
    from posterior.results import Info
    from posterior.samplers.common import draw, make_result, tilted_weights
    from posterior.samplers.options import Options, integer, option
    from posterior.samplers.registry import SAMPLERS, Method, register

    @dataclass(frozen=True)
    class ToyOptions(Options):
        method = "toy_is"
        rounds: int = option(1, integer(1), "prior draws per sample")

    @dataclass(frozen=True, eq=False)
    class ToyInfo(Info):
        rounds: int | None = None

    def run(post, prompts, options, *, n, max_new_tokens, generator, progress=False):
        d = draw(post, prompts, n * options.rounds, max_new_tokens, generator=generator)
        tw = tilted_weights(d, post.beta, prompts, what="toy weights")
        return make_result(post, "toy_is", prompts, d.cont, log_prior=d.log_prior, rewards=d.rewards,
                           log_weights=tw.stats.log_weights, log_Z=tw.log_Z, ess=tw.stats.ess, kl=tw.kl, exact_scale=True,
                           info=ToyInfo(rounds=options.rounds))  # fmt: skip

    register(Method("toy_is", ToyOptions, ToyInfo, run))
    try:
        assert pst.samplers.options_for("toy_is") is ToyOptions and pst.samplers.sampler_options("toy_is") == {"rounds": 1}
        with pytest.raises(ValueError, match=r"^rounds must be a positive int, got 0$"):
            post.sample(n=2, method="toy_is", max_new_tokens=T, rounds=0)
        with pytest.raises(ValueError, match=r"method 'toy_is' option rounds must be a positive int, got 0 \(--option rounds=0\)"):
            check_method_options("toy_is", [("rounds", 0)])
        with pytest.raises(TypeError, match=r"method 'toy_is' has no option\(s\) \['steps'\]"):
            post.sample(n=2, method="toy_is", max_new_tokens=T, steps=3)
        res = post.sample(n=4000, method="toy_is", max_new_tokens=T, seed=1, rounds=2)
        assert isinstance(res.info, ToyInfo) and res.info["rounds"] == 2 and res.log_weights.shape == (1, 8000)
        assert tv_to_exact(res, exact) < tv_tolerance(exact.prob().values(), res.ess.item())
        assert abs(res.log_Z.item() - exact.log_Z) < 0.05
    finally:
        SAMPLERS.pop("toy_is", None)


def test_register_sampler_keeps_working_for_plain_functions(post):
    from posterior.samplers.registry import SAMPLERS, register_sampler

    @register_sampler("plain_bon")
    def plain(post, prompts, *, n, max_new_tokens, generator, progress=False, k: int = 3):
        return SAMPLERS["bon"](post, prompts, n=n, max_new_tokens=max_new_tokens, generator=generator, best_of=k)

    try:
        O = pst.samplers.options_for("plain_bon")
        assert O.defaults() == {"k": 3} and pst.samplers.sampler_options("plain_bon") == {"k": 3}
        res = post.sample(n=4, method="plain_bon", max_new_tokens=T, seed=0, k=2)
        assert res.info["best_of"] == 2
        with pytest.raises(TypeError, match=r"method 'plain_bon' has no option\(s\) \['best_of'\]"):
            post.sample(n=4, method="plain_bon", max_new_tokens=T, best_of=2)
    finally:
        SAMPLERS.pop("plain_bon", None)
