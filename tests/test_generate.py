"""``pst.generate``: the model.generate calling convention over Posterior.sample.

Tiny config-built models (posterior.testing) for the plumbing, an enumerable CallablePrior for
the claim that the rows are draws of pi*, and one slow test on the default model.
"""

import functools
import math
import sys
import types

import pytest
import torch

from conftest import count_a_reward

import posterior as pst
from posterior.exact import exact_posterior
from posterior.rewards import Callable, RewardError, from_trl
from posterior.samplers.drivers import stack_results
from posterior.testing import tiny_hf_prior, two_token_prior

PROMPTS = ["hello", "good day"]


@pytest.fixture(scope="module")
def tiny():
    prior = tiny_hf_prior()
    return prior.model, prior.tokenizer


def count_a(texts):
    return [float(t.count("a")) for t in texts]


REWARD = Callable(count_a, name="count_a")


def reward_len(completions, **kwargs):  # verbatim from TRL's GRPO documentation
    return [-abs(20 - len(completion)) for completion in completions]


@pytest.mark.parametrize("method,options", [("smc", {}), ("is", {}), ("mh", {"steps": 2}), ("bon", {"best_of": 2})])
def test_same_seed_same_texts_as_posterior_sample(tiny, method, options):
    model, tok = tiny
    out = pst.generate(model, tok, PROMPTS, reward=REWARD, beta=0.5, method=method, n=3, seed=7, max_new_tokens=6, **options)
    ref = pst.Posterior(pst.HFPrior(model, tok), REWARD, 0.5).sample(
        n=3, method=method, max_new_tokens=6, prompts=PROMPTS, seed=7, **options
    )
    assert out.result.texts == ref.texts
    assert torch.equal(out.result.tokens, ref.tokens) and torch.equal(out.result.log_weights, ref.log_weights)


def test_sequences_are_shaped_like_model_generate(tiny):
    model, tok = tiny
    ids = torch.full((2, 8), 2, dtype=torch.long)  # the char tokenizer has no pad token: pad by hand with EOS
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        row = tok(p)["input_ids"]
        ids[i, 8 - len(row):], mask[i, 8 - len(row):] = torch.tensor(row), 1
    n, M = 3, 6
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=n, max_new_tokens=M,
                         pad_token_id=2, eos_token_id=2, top_k=None)
    out = pst.generate(model, tok, ids, attention_mask=mask, reward=REWARD, beta=0.5, n=n, max_new_tokens=M,
                       pad_token_id=2, eos_token_id=2)
    assert out.sequences.dtype == torch.long and out.sequences.shape[0] == ref.shape[0] == 2 * n
    assert 8 < out.sequences.shape[1] <= 8 + M
    assert torch.equal(out.sequences[:, :8], ref[:, :8])  # the prompt as given, repeated prompt-major
    res = out.result
    for row in range(2 * n):
        p, j = divmod(row, n)
        i = int(out.indices[p, j])
        L = int(res.lengths[p, i])
        assert out.sequences[row, 8 : 8 + L].tolist() == res.tokens[p, i, :L].tolist()
        assert (out.sequences[row, 8 + L :] == 2).all()  # pad after EOS
        assert out.texts[row] == res.texts[p][i]


def test_pad_token_fills_after_eos_and_text_prompts_are_left_padded(tiny):
    model, tok = tiny
    out = pst.generate(model, tok, PROMPTS, reward=REWARD, beta=0.5, method="is", n=4, max_new_tokens=6, pad_token_id=0)
    L = max(len(tok(p)["input_ids"]) for p in PROMPTS)
    short = tok(PROMPTS[0])["input_ids"]
    assert out.sequences[0, : L - len(short)].tolist() == [0] * (L - len(short))
    assert out.sequences[0, L - len(short) : L].tolist() == short
    res = out.result
    for row in range(8):
        p, j = divmod(row, 4)
        n_tok = int(res.lengths[p, int(out.indices[p, j])])
        assert (out.sequences[row, L + n_tok :] == 0).all()


def test_left_padded_input_ids_sample_what_the_texts_sample(tiny):
    model, tok = tiny
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    L = max(map(len, rows))
    ids = torch.tensor([[2] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    a = pst.generate(model, tok, {"input_ids": ids, "attention_mask": mask}, reward=REWARD, beta=0.5, n=3, max_new_tokens=5)
    b = pst.generate(model, tok, PROMPTS, reward=REWARD, beta=0.5, n=3, max_new_tokens=5)
    assert a.result.prompts == PROMPTS and a.result.texts == b.result.texts
    assert torch.equal(a.sequences[:, L:], b.sequences[:, L:])


def test_ids_that_do_not_round_trip_are_conditioned_on_exactly(tiny):
    """<bos> + "hello": decode drops the special token, so the text re-encodes differently; the
    sampler must still condition on the given ids."""
    model, tok = tiny
    ids = torch.tensor([[1] + tok("hello")["input_ids"]])
    out = pst.generate(model, tok, ids, reward=REWARD, beta=0.5, method="is", n=4, max_new_tokens=5)
    res = out.result
    assert res.prompts == ["hello"]
    prior = pst.HFPrior(model, tok)
    exact = prior.log_prob([ids[0].tolist()], res.tokens, res.lengths)
    plain = prior.log_prob(prior.encode_prompts(["hello"]), res.tokens, res.lengths)
    assert torch.allclose(res.log_prior, exact, atol=1e-5)
    assert not torch.allclose(res.log_prior, plain, atol=1e-3)


def test_temperature_top_k_top_p_change_the_prior_and_say_so(tiny):
    model, tok = tiny
    out = pst.generate(model, tok, PROMPTS, reward=REWARD, beta=0.5, n=3, max_new_tokens=5, temperature=0.7, top_k=5, top_p=0.9)
    ref = pst.Posterior(pst.HFPrior(model, tok, temperature=0.7, top_k=5, top_p=0.9), REWARD, 0.5).sample(
        n=3, method="smc", max_new_tokens=5, prompts=PROMPTS, seed=0
    )
    assert out.result.texts == ref.texts
    p = out.result.prior
    assert p["modified"] and p["temperature"] == 0.7 and p["top_k"] == 5 and p["top_p"] == 0.9
    assert "temperature" in out.note and "prior" in out.result.summary()
    plain = pst.generate(model, tok, PROMPTS, reward=REWARD, beta=0.5, n=3, max_new_tokens=5)
    assert not plain.result.prior["modified"] and "pi0 is the model with" not in plain.note


def test_rows_are_draws_of_the_exact_posterior():
    """Weighted IS samples resampled by weight: row frequencies match the enumerated pi*
    within 3 sigma (variance of the weighted empirical, 1/ESS, plus the resampling's, 1/n)."""
    from conftest import tv_tolerance
    from posterior.exact import empirical, sequence_keys, total_variation

    prior = two_token_prior()
    reward = Callable(lambda ts: [float(t.count("a")) - 0.5 * len(t) for t in ts], name="a-b")
    beta, M, n = 0.5, 3, 4000
    out = pst.generate(prior, None, None, reward=reward, beta=beta, method="is", n=n, max_new_tokens=M, seed=3)
    assert out.resampled and out.sequences.shape[0] == n and "resampling" in out.note
    exact = exact_posterior(prior, reward, beta, max_new_tokens=M)
    idx = out.indices  # (1, n)
    tokens = out.result.tokens.gather(1, idx[..., None].expand(-1, -1, out.result.tokens.shape[-1]))
    keys = sequence_keys(tokens, out.result.lengths.gather(1, idx))[0]
    tv = total_variation(empirical(keys, None), exact.prob())
    ess = float(out.result.ess[0])
    assert tv < tv_tolerance(list(exact.prob().values()), 1.0 / (1.0 / ess + 1.0 / n)), (tv, ess)


def test_equal_weights_are_not_resampled(tiny):
    model, tok = tiny
    out = pst.generate(model, tok, PROMPTS, reward=REWARD, beta=0.5, method="bon", n=3, max_new_tokens=5, best_of=2)
    assert not out.resampled and out.indices.tolist() == [[0, 1, 2]] * 2
    assert "does not target pi*" in out.note


def test_method_options_pass_through_and_unknown_keywords_raise(tiny):
    model, tok = tiny
    always = pst.generate(model, tok, "hello", reward=REWARD, beta=0.5, n=3, max_new_tokens=4, ess_threshold=1.0)
    never = pst.generate(model, tok, "hello", reward=REWARD, beta=0.5, n=3, max_new_tokens=4, ess_threshold=0.0)
    assert bool(always.result.info["resampled"][0, 0]) and not bool(never.result.info["resampled"].any())
    tilted = pst.generate(model, tok, "hello", reward=REWARD, beta=0.5, n=2, max_new_tokens=4, proposal="tilted",
                          lookahead=3, method_options={"ess_threshold": 1.0})
    assert tilted.result.info["proposal"] == "tilted"
    with pytest.raises(TypeError, match=r"\['num_beams'\]"):
        pst.generate(model, tok, "hello", reward=REWARD, beta=0.5, num_beams=4)
    with pytest.raises(ValueError, match="greedy"):
        pst.generate(model, tok, "hello", reward=REWARD, beta=0.5, do_sample=False)
    with pytest.raises(ValueError, match="n=4 and num_return_sequences=2 disagree"):
        pst.generate(model, tok, "hello", reward=REWARD, beta=0.5, n=4, num_return_sequences=2)
    assert pst.generate(model, tok, "hello", reward=REWARD, beta=0.5, num_return_sequences=2,
                        max_new_tokens=3).sequences.shape[0] == 2
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 2\)"):
        pst.generate(model, tok, torch.tensor([[3, 4, 5]]), attention_mask=torch.ones(1, 2), reward=REWARD, beta=0.5)
    with pytest.raises(ValueError, match="row #1 has no tokens"):
        pst.generate(model, tok, torch.tensor([[3, 4], [5, 6]]), attention_mask=torch.tensor([[1, 1], [0, 0]]),
                     reward=REWARD, beta=0.5)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        pst.generate(model, None, "hello", reward=REWARD, beta=0.5)
    with pytest.raises(ValueError, match="beta must be"):
        pst.generate(model, tok, "hello", reward=REWARD, beta=0.0)


def test_a_vllm_llm_is_wrapped_as_vllm_prior(tiny, monkeypatch):
    """Dispatch by the class's module name (vllm is never imported here): the branch builds
    ``posterior.priors.vllm.VLLMPrior(llm, temperature=...)`` and uses the prior's tokenizer."""
    model, tok = tiny
    calls = []

    def fake_vllm_prior(llm, **kw):
        calls.append((llm, kw))
        return pst.HFPrior(model, tok, **kw)

    monkeypatch.setitem(sys.modules, "posterior.priors.vllm", types.SimpleNamespace(VLLMPrior=fake_vllm_prior))
    LLM = type("LLM", (), {"__module__": "vllm.entrypoints.llm"})
    llm = LLM()
    out = pst.generate(llm, None, PROMPTS, reward=REWARD, beta=0.5, n=2, max_new_tokens=4, temperature=0.8)
    assert calls == [(llm, {"temperature": 0.8})] and out.result.prior["temperature"] == 0.8
    ref = pst.generate(model, tok, PROMPTS, reward=REWARD, beta=0.5, n=2, max_new_tokens=4, temperature=0.8)
    assert out.result.texts == ref.result.texts


# --------------------------------------------------------------------------------------------------
# TRL reward functions through generate / Posterior.sample
# --------------------------------------------------------------------------------------------------
def test_trl_reward_len_runs_unchanged(tiny):
    model, tok = tiny
    out = pst.generate(model, tok, PROMPTS, reward=from_trl(reward_len), beta=0.5, n=3, max_new_tokens=6)
    res = out.result
    assert res.rewards.tolist() == [[-abs(20 - len(t)) for t in row] for row in res.texts]
    assert res.prompts == PROMPTS and "one per prompt" in res.info["runs"]


def test_per_prompt_runs_equal_single_prompt_runs(tiny):
    """A reward that reads prompts is sampled one prompt at a time with one generator: the stacked
    result equals the single-prompt runs, in order, and each text is scored with its own prompt."""
    model, tok = tiny

    def fn(prompts, completions, completion_ids, **kw):
        return [float(len(p)) + 0.01 * len(c) for p, c in zip(prompts, completions)]

    post = pst.Posterior(pst.HFPrior(model, tok), from_trl(fn), beta=1.0)
    res = post.sample(n=3, method="smc", max_new_tokens=5, prompts=PROMPTS, seed=0)
    g = torch.Generator().manual_seed(0)
    single = [pst.Posterior(post.prior, from_trl(fn), 1.0).sample(n=3, method="smc", max_new_tokens=5, prompts=[p],
                                                                  generator=g) for p in PROMPTS]
    for p, prompt in enumerate(PROMPTS):
        assert res.texts[p] == single[p].texts[0]
        assert torch.equal(res.log_weights[p], single[p].log_weights[0])
        assert torch.allclose(res.log_Z[p], single[p].log_Z[0])
        steps = single[p].info["ess_per_step"].shape[-1]
        assert torch.equal(res.info["ess_per_step"][p, :steps], single[p].info["ess_per_step"][0])
        assert torch.allclose(res.info["log_Z_increments"][p].sum(), res.log_Z[p].double())
        assert res.rewards[p].tolist() == pytest.approx([len(prompt) + 0.01 * len(t) for t in res.texts[p]])
    assert res.info["runs"].startswith("one per prompt (2)")


def test_stack_results_pads_per_step_arrays():
    def fake(steps, prompt):
        P, N = 1, 2
        return pst.SampleResult(
            method="smc", beta=1.0, prompts=[prompt], texts=[["a", "b"]], tokens=torch.zeros(P, N, steps, dtype=torch.long),
            lengths=torch.ones(P, N, dtype=torch.long), log_weights=torch.full((P, N), -math.log(2)),
            rewards=torch.zeros(P, N, dtype=torch.float64), log_prior=torch.zeros(P, N), log_Z=torch.tensor([-1.0 * steps]),
            ess=torch.full((P,), 2.0),
            info={"ess_per_step": torch.ones(P, steps), "log_Z_increments": -torch.ones(P, steps, dtype=torch.float64),
                  "resampled": torch.ones(P, steps, dtype=torch.bool), "proposal": "bootstrap", "x": prompt},
        )

    out = stack_results([fake(2, "p"), fake(3, "q")], pad_token=9)
    assert out.prompts == ["p", "q"] and out.tokens.shape == (2, 2, 3) and out.tokens[0, :, 2].tolist() == [9, 9]
    assert torch.isnan(out.info["ess_per_step"][0, 2]) and out.info["resampled"][0].tolist() == [True, True, False]
    assert out.info["log_Z_increments"].sum(-1).tolist() == out.log_Z.tolist() == [-2.0, -3.0]
    assert out.info["proposal"] == "bootstrap" and out.info["x"] == ["p", "q"]


def test_trl_columns_prompts_async_and_none(tiny):
    model, tok = tiny
    got = []

    async def correct(prompts, completions, completion_ids, answer, **kwargs):
        got.append((prompts[0], answer[0], len(completions), completion_ids))
        return [1.0 if answer[0] in c else 0.0 for c in completions]

    r = from_trl(correct, answer=["l", "d"])
    out = pst.generate(model, tok, PROMPTS, reward=r, beta=1.0, method="is", n=4, max_new_tokens=5)
    assert {(p, a) for p, a, *_ in got} == {("hello", "l"), ("good day", "d")}
    for p, a, m, ids in got:  # generate passes the model's tokenizer: completion_ids are filled in
        assert ids is not None and len(ids) == m
    res = out.result
    assert res.rewards.tolist() == [[1.0 if a in t else 0.0 for t in row] for a, row in zip("ld", res.texts)]

    def sometimes(completions, **kw):
        return [None if "e" in c else 1.0 for c in completions]

    texts = ["abc", "bed"]
    with pytest.raises(RewardError, match="returned None for completion 'bed'.*skip_none=True"):
        from_trl(sometimes).for_prompt("hi", 0)(texts)
    assert from_trl(sometimes, skip_none=True).for_prompt("hi", 0)(texts).tolist() == [1.0, -math.inf]
    with pytest.raises(RewardError, match="reads prompts"):
        from_trl(reward_len)(texts)
    with pytest.raises(RewardError, match="column 'answer' has 2 values but prompt #2"):
        r.for_prompt("x", 2)(texts)
    with pytest.raises(ValueError, match="one value per prompt"):
        from_trl(correct, answer="l")


def test_trl_in_a_weighted_sum_and_log_density(tiny):
    model, tok = tiny
    r = 0.5 * from_trl(reward_len) + REWARD
    assert r.needs_prompts
    post = pst.Posterior(pst.HFPrior(model, tok), r, beta=1.0)
    res = post.sample(n=2, method="is", max_new_tokens=4, prompts=PROMPTS)
    want = [[0.5 * -abs(20 - len(t)) + t.count("a") for t in row] for row in res.texts]
    assert res.rewards.tolist() == want
    lp = post.log_density(["ab"], prompt="hello")
    lp0 = pst.Posterior(post.prior, REWARD, 1.0).log_density(["ab"], prompt="hello")
    assert torch.allclose(lp - lp0, torch.tensor([0.5 * -18.0], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_generate_matches_posterior_sample():
    prior = pst.load_default_prior()
    model, tok = prior.model, prior.tokenizer
    enc = tok(["The movie was"], return_tensors="pt")
    out = pst.generate(model, tok, enc, reward=pst.rewards.Sentiment(), beta=0.2, n=4, max_new_tokens=8)
    ref = pst.Posterior(prior, pst.rewards.Sentiment(), 0.2).sample(n=4, method="smc", max_new_tokens=8,
                                                                   prompts=["The movie was"], seed=0)
    assert out.result.texts == ref.texts and out.sequences.shape[0] == 4
    assert tok.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True) == out.texts


def test_top_k_1_and_top_p_1_count_as_asked_for():
    """Regression: top_k=1 (== 1.0) and top_p=1.0 were dropped as if they were defaults."""
    from posterior.generate import _modifications

    assert _modifications(1.0, 1, 1.0) == {"top_k": 1, "top_p": 1.0}
    assert _modifications(0.5, None, None) == {"temperature": 0.5}


def test_one_dimensional_ids_unconditional_and_mask_inferred_from_pad(tiny):
    model, tok = tiny
    row = tok("hello")["input_ids"]
    kw = dict(reward=REWARD, beta=0.5, method="is", n=2, max_new_tokens=4)
    one = pst.generate(model, tok, torch.tensor(row), **kw)
    assert one.result.prompts == ["hello"] and one.sequences[:, : len(row)].tolist() == [row] * 2
    assert one.result.texts == pst.generate(model, tok, "hello", **kw).result.texts
    uncond = pst.generate(model, tok, None, **kw)
    assert uncond.result.prompts is None and uncond.sequences[:, 0].tolist() == [1, 1]  # <bos>, then the samples
    # No attention mask: as in model.generate, a pad id that is not EOS marks padding.
    padded = pst.generate(model, tok, torch.tensor([[0, 0] + row]), pad_token_id=0, **kw)
    assert padded.result.prompts == ["hello"] and padded.result.texts == one.result.texts


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening2.py (issue 19, hardening round two); each test is named after the failure it pins down
# --------------------------------------------------------------------------------------------------
count_a_h19 = functools.partial(count_a_reward, name="count_a")


def test_consistency_one_validator_module_generate_refuses_a_zero_inside_the_attention_mask():
    """A 0 between prompt tokens silently dropped that token from the prompt."""
    prior = tiny_hf_prior("llama")
    model, tok = prior.model, prior.tokenizer
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(ValueError, match=r"input row #1: attention_mask has a 0 at position 2, between prompt tokens"):
        pst.generate(model, tok, ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]]), reward=count_a_h19(),
                     beta=0.5, max_new_tokens=2)  # fmt: skip
    out = pst.generate(model, tok, ids, attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), reward=count_a_h19(),
                       beta=0.5, n=2, max_new_tokens=2)  # left padding is still padding  # fmt: skip
    assert out.sequences.shape[0] == 4
