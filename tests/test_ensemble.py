"""Reward ensembles (mean / wco / uwo), the AFINN / TextBlob lexicons, the length and repetition
penalties, and their registry specs: each checked against its formula, on every sequence of an
enumerable toy where the reward is an ensemble."""

import importlib.util
import math

import pytest
import torch

import posterior as pst
from posterior.exact import enumerate_continuations
from posterior.rewards import Afinn, Callable, Ensemble, LengthPenalty, RepetitionPenalty, TextBlob, from_spec
from posterior.rewards.registry import check_spec
from posterior.rewards.ensemble import combine_scores
from posterior.testing import markov_prior

needs_textblob = pytest.mark.skipif(importlib.util.find_spec("textblob") is None, reason="the textblob extra is not installed")
M = 3  # max_new_tokens of the toy: 1 + 3 + 9 + 27 sequences over {a, b, c}


def count_a(texts):
    return [float(t.count("a")) for t in texts]


def minus_c(texts):
    return [-0.7 * t.count("c") + 0.2 * len(t) for t in texts]


def b_or_dead(texts):
    """-inf unless the text holds a b: a hard constraint as an ensemble member."""
    return [0.5 if "b" in t else -math.inf for t in texts]


@pytest.fixture(scope="module")
def toy_texts():
    prior = markov_prior(seed=1)
    seqs, _ = enumerate_continuations(prior, M)
    eos = set(prior.eos_token_ids)
    return [prior.decode([i for i in s if i not in eos]) for s in seqs]


def members3():
    return [Callable(count_a, name="a"), Callable(minus_c, name="c"), Callable(b_or_dead, name="b")]


def by_formula(texts, mode, lam=None):
    """The ensemble reward of each text computed from its definition, one text at a time."""
    out = []
    for t in texts:
        s = [count_a([t])[0], minus_c([t])[0], b_or_dead([t])[0]]
        if any(math.isinf(x) for x in s):
            out.append(-math.inf)
            continue
        mean = sum(s) / len(s)
        if mode == "mean":
            out.append(mean)
        elif mode == "wco":
            out.append(min(s))
        else:
            out.append(mean - lam * sum((x - mean) ** 2 for x in s) / len(s))  # population variance
    return out


@pytest.mark.parametrize("mode,lam", [("mean", None), ("wco", None), ("uwo", 0.0), ("uwo", 0.5), ("uwo", 3.0)])
def test_every_mode_equals_its_formula_on_every_sequence_of_the_toy(toy_texts, mode, lam):
    ens = Ensemble(members3(), mode, uwo_weight=lam)
    got = ens(toy_texts)
    want = torch.tensor(by_formula(toy_texts, mode, lam), dtype=torch.float64)
    dead = torch.isneginf(want)
    assert bool(dead.any()) and bool((~dead).any())  # the toy has both kinds of text
    assert torch.equal(torch.isneginf(got), dead)
    assert torch.allclose(got[~dead], want[~dead], rtol=0, atol=1e-12)
    assert not bool(torch.isnan(got).any())


def test_members_scores_are_the_members_rewards_and_combine_to_the_ensemble(toy_texts):
    ens = Ensemble(members3(), "uwo", uwo_weight=0.5)
    s = ens.members_scores(toy_texts)
    assert s.shape == (3, len(toy_texts)) and s.dtype == torch.float64
    for m, member in enumerate(ens.members):
        assert torch.equal(s[m], member(toy_texts))
    assert torch.equal(ens.combine(s), ens(toy_texts))


def test_neg_inf_in_any_member_is_neg_inf_without_nan_from_the_variance():
    s = torch.tensor([[-math.inf, 1.0, -math.inf], [2.0, 3.0, -math.inf]], dtype=torch.float64)
    for mode in ("mean", "wco", "uwo"):
        out = combine_scores(s, mode, 1.0 if mode == "uwo" else None)
        assert torch.isneginf(out[0]) and torch.isneginf(out[2]) and torch.isfinite(out[1]), mode
    assert combine_scores(s, "uwo", 2.0)[1].item() == 2.0 - 2.0 * 1.0  # column (1, 3): mean 2, variance 1


def test_uwo_with_weight_zero_is_the_mean_and_a_single_member_is_itself(toy_texts):
    a = Callable(count_a, name="a")
    assert torch.equal(Ensemble([a], "uwo", uwo_weight=5.0)(toy_texts), a(toy_texts))
    assert torch.equal(Ensemble([a], "wco")(toy_texts), a(toy_texts))
    two = [a, Callable(minus_c, name="c")]
    assert torch.allclose(Ensemble(two, "uwo", uwo_weight=0.0)(toy_texts), Ensemble(two, "mean")(toy_texts), atol=0)


def test_prefix_capability_only_when_every_member_has_it():
    sent, afinn = pst.rewards.Sentiment(), Afinn()
    assert Ensemble([sent, afinn]).accepts_prefixes
    assert not Ensemble([sent, Callable(count_a)]).accepts_prefixes
    assert Ensemble([Callable(b_or_dead)]).can_be_neg_inf


def test_ensemble_of_prompt_reading_members_reads_prompts():
    class EchoLen(pst.rewards.Reward):
        needs_prompts = True

        def __init__(self, prompt=""):
            self.prompt = prompt

        def for_prompt(self, prompt, index):
            return EchoLen(prompt)

        def score(self, texts):
            return [float(len(self.prompt)) for _ in texts]

    ens = Ensemble([EchoLen(), Callable(count_a)], "mean")
    assert ens.needs_prompts
    bound = ens.for_prompt("four", 0)
    assert bound(["aa"]).tolist() == [(4.0 + 2.0) / 2]


@pytest.mark.parametrize("bad,match", [
    (([], "mean"), "at least one"), ((None, "mean"), "list of rewards"), ((["x"], "median"), "mode"),
])  # fmt: skip
def test_bad_ensembles_name_the_value(bad, match):
    members, mode = bad
    members = [Callable(count_a) for _ in members] if isinstance(members, list) else members
    with pytest.raises(ValueError, match=match):
        Ensemble(members, mode)


def test_uwo_weight_is_required_for_uwo_and_refused_elsewhere():
    a = Callable(count_a)
    for w in (None, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="uwo_weight"):
            Ensemble([a], "uwo", uwo_weight=w)
    with pytest.raises(ValueError, match="only used with mode 'uwo'"):
        Ensemble([a], "mean", uwo_weight=0.5)


# --- lexicons and penalties ------------------------------------------------------------------------
def test_afinn_is_vaders_normalisation_of_the_afinn_sum_and_needs_no_download():
    r = Afinn()
    texts = ["", "This is great", "great great great", "The movie was terrible.", "good but bad"]
    raw = [0.0, 3.0, 9.0, -3.0, 0.0]  # AFINN-165: great +3, terrible -3, good +3, bad -3
    assert [r.raw(t) for t in texts] == raw
    assert r(texts).tolist() == pytest.approx([s / math.sqrt(s * s + 15.0) for s in raw], abs=1e-15)
    assert bool((r(texts).abs() < 1).all())


@needs_textblob
def test_textblob_polarity_in_range_without_corpora():
    r = TextBlob()
    got = r(["", "a great movie", "The movie was terrible.", "not good"]).tolist()
    assert got[0] == 0.0 and got[1] > 0 and got[2] == -1.0 and got[3] < 0
    assert all(-1.0 <= x <= 1.0 for x in got)


def test_length_penalty_exact():
    r = LengthPenalty(3, coef=0.25)
    assert r(["", "one two three", "one two three four", "a b c d e f"]).tolist() == [0.0, 0.0, -0.25, -0.75]
    assert LengthPenalty(0)(["x y"]).tolist() == [pytest.approx(-0.2)]  # default coef 0.1


def test_repetition_penalty_exact():
    r = RepetitionPenalty(2, coef=2.0)
    # bigrams of "a b a b a": (a b) (b a) (a b) (b a): 2 distinct of 4 -> 1 - 2/4 = 0.5
    assert r(["a b a b a", "a b c", "one", "The the THE the"]).tolist() == [-1.0, 0.0, 0.0, -2.0 * (1 - 1 / 3)]
    assert RepetitionPenalty(1)(["go go go stop"]).tolist() == [-(1 - 2 / 4)]


@pytest.mark.parametrize("cls,args,match", [
    (LengthPenalty, (-1,), "max_words"), (LengthPenalty, (2.5,), "max_words"), (LengthPenalty, (3, 0.0), "coef"),
    (RepetitionPenalty, (0,), "n must"), (RepetitionPenalty, (2, -1.0), "coef"), (RepetitionPenalty, (2, math.inf), "coef"),
])  # fmt: skip
def test_bad_penalties_name_the_value(cls, args, match):
    with pytest.raises(ValueError, match=match):
        cls(*args)


# --- registry --------------------------------------------------------------------------------------
@needs_textblob
def test_ensemble_specs_build_the_ensembles():
    r = from_spec("ensemble:uwo:0.5:sentiment,afinn")
    assert isinstance(r, Ensemble) and r.mode == "uwo" and r.uwo_weight == 0.5
    assert [type(m).__name__ for m in r.members] == ["Sentiment", "Afinn"]
    texts = ["a great day", "awful, awful weather", "hello"]
    s = torch.stack([pst.rewards.Sentiment()(texts), Afinn()(texts)])
    assert torch.allclose(r(texts), s.mean(0) - 0.5 * s.var(0, unbiased=False), atol=1e-15)
    assert from_spec("ensemble:mean:sentiment,afinn").mode == "mean"
    w = from_spec("ensemble:wco:sentiment,textblob,length:3:0.5")
    assert w.mode == "wco" and isinstance(w.members[2], LengthPenalty) and w.members[2].coef == 0.5


@needs_textblob
def test_penalty_and_lexicon_specs():
    assert isinstance(from_spec("afinn"), Afinn) and isinstance(from_spec("textblob"), TextBlob)
    lp = from_spec("length:12")
    assert (lp.max_words, lp.coef) == (12, 0.1)
    rp = from_spec("repetition:3:0.5")
    assert (rp.n, rp.coef) == (3, 0.5) and from_spec("repetition").n == 2


@pytest.mark.parametrize("spec,match", [
    ("ensemble", "needs an argument"), ("ensemble:median:sentiment", "mode 'median'"),
    ("ensemble:uwo:lots:sentiment,afinn", "uwo WEIGHT .* got 'lots'"), ("ensemble:mean:", "names no members"),
    ("ensemble:mean:sentiment,nope", "member 'nope'.*unknown reward 'nope'"),
    ("ensemble:mean:sentiment,length:x", "member 'length:x'.*WORDS"),
    ("ensemble:mean:ensemble:mean:afinn", "do not nest"), ("ensemble:uwo:-1:sentiment", "uwo WEIGHT .* >= 0, got -1"),
    ("length", "needs an argument"), ("length:ten", "WORDS .* got 'ten'"), ("length:3:x", "COEF .* got 'x'"),
    ("length:-1", "WORDS .* non-negative int, got -1"), ("length:3:0", "COEF .* > 0, got 0"),
    ("length:3:inf", "COEF .* finite"), ("repetition:0", "N .* positive int, got 0"),
    ("length:3:1:2", "3 arguments"), ("repetition:two", "N .* got 'two'"), ("afinn:x", "takes no argument"),
    ("contains", "needs an argument"), ("classifier:model_dir", "PATH:LABEL"), ("judge", "needs an argument"),
    ("ensemble:mean:sentiment,repetition:1:-2", "member 'repetition:1:-2'.*COEF"),
])  # fmt: skip
def test_bad_specs_name_the_bad_part(spec, match):
    """Building the reward and the torch-free check (what the CLI runs first) give the same error."""
    with pytest.raises(ValueError, match=match) as built:
        from_spec(spec)
    with pytest.raises(ValueError) as checked:
        check_spec(spec)
    assert str(checked.value) == str(built.value)
