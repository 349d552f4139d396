"""Regression tests for issue 19 (hardening, round two), library half: each test is named after the
class of failure it pins down, and fails on the code before the fix."""

import math

import numpy as np
import pytest
import torch

import posterior as pst
from posterior.errors import CheckpointError, DegenerateWeightsError
from posterior.exact import exact_posterior
from posterior.rewards import Callable, Reward
from posterior.testing import markov_prior, tiny_hf_prior, two_token_prior
from posterior.train import fit, load_policy, policy_from
from posterior.train.checkpoint import checkpoint_path, steps_of

T = 3  # two_token_prior at max_new_tokens=3: 15 continuations


def count_a(scale: float = 1.0):
    return Callable(lambda ts: [scale * t.count("a") for t in ts], name="count_a")


def const(c: float):
    return Callable(lambda ts: [c] * len(ts), name="const")


# --------------------------------------------------------------------------------------------------
# 1. A checkpoint belongs to one run
# --------------------------------------------------------------------------------------------------
def _fit(directory, *, prior=None, reward=None, beta=1.0, objective="forward_kl", steps=2, prompts=None, **kw):
    prior = prior or two_token_prior()
    post = pst.Posterior(prior, reward or count_a(), beta=beta)
    policy = policy_from(prior, max_new_tokens=T, prompts=prompts)
    args = dict(steps=steps, batch_size=4, lr=0.1, max_new_tokens=T, checkpoint_dir=directory, checkpoint_every=1)
    return fit(post, policy, objective=objective, prompts=prompts, **{**args, **kw})


@pytest.mark.parametrize("change, field", [
    (dict(reward=count_a(2.0)), "reward.fingerprint"),  # same name, other values
    (dict(prior=markov_prior(("a", "b", "<eos>"), seed=1)), "prior.fingerprint"),  # same vocabulary, other pi0
    (dict(beta=2.0), "beta: 1.0 -> 2.0"),
    (dict(prompts=["a"]), "prompts: None -> ['a']"),
    (dict(objective="js"), "objective: 'forward_kl' -> 'js'"),
    (dict(seed=1), "seed: 0 -> 1"),
    (dict(batch_size=3), "batch_size: 4 -> 3"),
])  # fmt: skip
def test_checkpoint_belongs_to_one_run_resume_of_another_run_is_refused(tmp_path, change, field):
    """Resuming into the directory of another run (reward, prior, beta, prompts, objective,
    hyper-parameters) continued and mixed both runs' metrics and running log Z."""
    _fit(tmp_path)
    with pytest.raises(ValueError, match="other settings") as e:
        _fit(tmp_path, steps=4, **change)
    assert field in str(e.value)
    assert sorted(steps_of(tmp_path)[0]) == [1, 2]  # nothing written by the refused run


def test_checkpoint_belongs_to_one_run_names_every_differing_field_and_allows_a_deliberate_change(tmp_path):
    _fit(tmp_path)
    with pytest.raises(ValueError) as e:
        _fit(tmp_path, steps=4, lr=0.2, batch_size=3)
    assert "batch_size: 4 -> 3" in str(e.value) and "lr: 0.1 -> 0.2" in str(e.value)
    run = _fit(tmp_path, steps=4, lr=0.2, allow_changes=("lr",))  # steps may grow; lr on purpose
    assert run.resumed_from == 2 and [m["step"] for m in run.metrics] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="allow_changes names unknown field"):
        _fit(tmp_path, steps=5, allow_changes=("lr_typo",))


def test_checkpoint_belongs_to_one_run_hf_prior_weights_are_fingerprinted(tmp_path):
    """Two HF priors of the same architecture and tokenizer but other weights are two runs."""
    kw = dict(objective="reverse_kl", steps=1, batch_size=2, lr=1e-2, max_new_tokens=3, prompts=["hi"],
              checkpoint_dir=tmp_path)  # fmt: skip
    for seed, steps in ((0, 1), (0, 2)):  # the same prior resumes
        prior = tiny_hf_prior("gpt2", seed=seed)
        fit(pst.Posterior(prior, count_a(), beta=1.0), policy_from(prior, lora_rank=2), **{**kw, "steps": steps})
    prior = tiny_hf_prior("gpt2", seed=1)
    with pytest.raises(ValueError, match=r"prior\.fingerprint"):
        fit(pst.Posterior(prior, count_a(), beta=1.0), policy_from(prior, lora_rank=2), **{**kw, "steps": 3})
    with pytest.raises(ValueError, match=r"policy\.kind: 'lora' -> 'full'"):
        prior = tiny_hf_prior("gpt2", seed=0)
        fit(pst.Posterior(prior, count_a(), beta=1.0), policy_from(prior), **{**kw, "steps": 3})


# --------------------------------------------------------------------------------------------------
# 2. Rejection sampling's Ẑ is unbiased for every n
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5])
def test_rejection_log_z_is_unbiased_for_every_n(n):
    """n = 1 used n/draws: E[1/D] for a geometric D is not p (+160% on the issue's toy, +77% here).
    Z = sum pi0 e^{r/beta} with r = count_a, bound R = 3; mean of Ẑ over 200 seeds within 3 SE."""
    prior, reward = two_token_prior(), count_a()
    post = pst.Posterior(prior, reward, beta=1.0)
    Z = math.exp(exact_posterior(prior, reward, 1.0, T).log_Z)
    z = torch.tensor([
        post.sample(n=n, method="rejection", max_new_tokens=T, seed=s, reward_upper_bound=3.0).log_Z.exp().item()
        for s in range(200)
    ], dtype=torch.float64)  # fmt: skip
    se = z.std().item() / math.sqrt(len(z))
    assert abs(z.mean().item() - Z) < 3 * se, (z.mean().item(), Z, se)


def test_rejection_log_z_is_unbiased_for_every_n_and_finite_at_n_1_under_a_hard_constraint():
    """A hard constraint (a(x) in {0, 1}) at n = 1: the estimate is finite on every seed, unbiased
    over seeds (3 SE), and the sample is the first accepted draw, one per prompt."""
    from posterior.rewards import Contains

    prior, reward = two_token_prior(), Contains("bb")
    post = pst.Posterior(prior, reward, beta=1.0)
    Z = math.exp(exact_posterior(prior, reward, 1.0, T).log_Z)
    runs = [post.sample(n=1, method="rejection", max_new_tokens=T, seed=s, reward_upper_bound=0.0) for s in range(200)]
    assert all(r.tokens.shape[1] == 1 and "bb" in r.texts[0][0] for r in runs)
    z = torch.tensor([r.log_Z.exp().item() for r in runs], dtype=torch.float64)
    assert bool(torch.isfinite(z.log()).all())
    se = z.std().item() / math.sqrt(len(z))
    assert abs(z.mean().item() - Z) < 3 * se, (z.mean().item(), Z, se)


# --------------------------------------------------------------------------------------------------
# 3. exact_posterior is exact at every scale
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [1e-12, 1e-17, 1e-300])
def test_exact_posterior_is_exact_at_every_scale(beta):
    """A constant reward at beta = 1e-17 gave a pi* summing to 13 and KL 38.5 (r/beta rounded log
    pi0 away). Constant: pi* = pi0 and log Z = c/beta + log sum pi0. Non-constant: r = 0.7·beta·#a
    at beta must equal r = 0.7·#a at beta = 1."""
    prior = two_token_prior()
    base = exact_posterior(prior, const(0.0), 1.0, T)
    ex = exact_posterior(prior, const(1.0), beta, T)
    assert ex.log_posterior.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(ex.log_posterior, base.log_posterior, atol=1e-12, rtol=0)
    assert ex.kl == pytest.approx(0.0, abs=1e-6)  # the prior is float32: sum pi0 = 1 to ~1e-7
    assert ex.log_Z == 1.0 / beta + base.log_Z  # base.log_Z ~ 1e-8 vanishes in the float64 sum
    want = exact_posterior(prior, count_a(0.7), 1.0, T)
    got = exact_posterior(prior, count_a(0.7 * beta), beta, T)
    assert torch.allclose(got.log_posterior, want.log_posterior, atol=1e-9, rtol=0)
    assert got.kl == pytest.approx(want.kl, abs=1e-9)
    assert got.log_Z == pytest.approx(want.log_Z, abs=1e-9)


def test_exact_posterior_is_exact_at_every_scale_or_refuses_where_log_z_overflows():
    with pytest.raises(ValueError, match="overflows float64"):
        exact_posterior(two_token_prior(), const(1e10), 1e-300, T)


# --------------------------------------------------------------------------------------------------
# 5. Contract violations that go unseen (library parts)
# --------------------------------------------------------------------------------------------------
class _PerPrompt(Reward):
    """Reads prompts: every continuation of prompt "b" gets -inf."""

    needs_prompts = True

    def for_prompt(self, prompt, index):
        return Callable(lambda ts: [-math.inf if prompt == "b" else 0.0] * len(ts), name=f"on {prompt}")

    def score(self, texts):
        raise AssertionError("bound per prompt")


def test_degenerate_weights_error_of_a_per_prompt_reward_names_the_failing_prompt():
    """The sampler ran on prompt 1 alone, so its error said rows=[0]: the wrong prompt."""
    post = pst.Posterior(two_token_prior(), _PerPrompt(), beta=1.0)
    with pytest.raises(DegenerateWeightsError) as e:
        post.sample(n=8, method="is", max_new_tokens=T, prompts=["a", "b"], seed=0)
    assert e.value.rows == [1] and "'b'" in str(e.value) and "prompt index 1" in str(e.value)


def test_dpg_training_with_every_reward_neg_inf_raises_naming_the_step(tmp_path):
    """forward_kl with no sample of positive weight 'trained' (no gradient) and wrote 'nan' metrics.
    A rare constraint may take a few steps to be met (no gradient until then): undefined metrics
    are None meanwhile, and a run in which no sample ever had positive weight raises."""
    prior = two_token_prior()
    post = pst.Posterior(prior, const(-math.inf), beta=1.0)
    with pytest.warns(UserWarning, match="no sample of some prompt has had positive posterior weight yet"):
        with pytest.raises(ValueError, match="forward_kl: by step 3 no sample of prompt 0 has had positive posterior weight"):
            fit(post, policy_from(prior, max_new_tokens=T), objective="dpg", steps=3, batch_size=4, lr=0.1,
                max_new_tokens=T, metrics_path=tmp_path / "m.jsonl")  # fmt: skip
    text = (tmp_path / "m.jsonl").read_text()
    assert "nan" not in text and '"kl_target_forward": null' in text
    with pytest.raises(ValueError, match="js, step 1: no sample of prompt 0"):  # f-DPG needs log Z at once
        fit(post, policy_from(prior, max_new_tokens=T), objective="js", steps=3, batch_size=4, lr=0.1, max_new_tokens=T)


# --------------------------------------------------------------------------------------------------
# 6. Damaged training state: one error naming the path and what is wrong
# --------------------------------------------------------------------------------------------------
def _damage(path, how):
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 10)
    elif how == "foreign":  # a torch file, but not ours
        torch.save({"weights": torch.zeros(2)}, path)
    elif how == "code":  # a pickle that would run code under weights_only=False
        import pickle

        path.write_bytes(pickle.dumps(np.random.default_rng(0)))


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "foreign", "code"])
def test_damaged_training_state_raises_checkpoint_error_naming_the_file(tmp_path, how):
    """Raw OSError / EOFError / UnpicklingError (suggesting weights_only=False) reached the user."""
    _fit(tmp_path, steps=1)
    path = checkpoint_path(tmp_path, 0, 1)
    _damage(path, how)
    with pytest.raises(CheckpointError) as e:
        _fit(tmp_path, steps=2)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and "weights_only" not in msg
    assert isinstance(e.value, ValueError)


def test_damaged_training_state_torn_latest_checkpoint_falls_back_to_the_previous_and_says_so(tmp_path):
    _fit(tmp_path, steps=2)
    _damage(checkpoint_path(tmp_path, 0, 2), "truncated")
    with pytest.warns(UserWarning, match=r"step00000002\.pt is truncated.*resuming from the previous checkpoint, step 1"):
        run = _fit(tmp_path, steps=3)
    assert run.resumed_from == 1 and [m["step"] for m in run.metrics] == [1, 2, 3]


def test_damaged_training_state_checkpoint_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=f"checkpoint_dir {f} cannot be a folder: {f} is a file"):
        _fit(f)
    with pytest.raises(CheckpointError, match=f"{f} is a file"):
        _fit(f / "sub")


def test_damaged_training_state_load_policy_on_missing_empty_or_damaged_folders(tmp_path):
    """load_policy on an empty folder said it "holds an HF policy"."""
    prior = two_token_prior()
    with pytest.raises(CheckpointError, match=f"policy folder {tmp_path / 'nope'} does not exist"):
        load_policy(prior, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is empty"):
        load_policy(prior, tmp_path / "empty")
    saved = policy_from(prior, max_new_tokens=T).save(tmp_path / "tab")
    _damage(saved / "tabular_policy.pt", "truncated")
    with pytest.raises(CheckpointError, match="tabular_policy.pt is truncated"):
        load_policy(prior, saved)
    hf = tiny_hf_prior("gpt2")
    saved = policy_from(hf, lora_rank=2).save(tmp_path / "lora")
    _damage(saved / "adapter_model.safetensors", "garbage")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_policy(hf, saved)


# --------------------------------------------------------------------------------------------------
# 8. Consistency: one validator module; errors before work, naming the value
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), torch.tensor(3), 3])
def test_consistency_one_validator_module_accepts_numpy_and_torch_scalars_and_refuses_bools(value):
    from posterior.validate import check_int, check_prob, check_real, check_seed

    assert check_int("k", value, 1) == 3 and type(check_int("k", value, 1)) is int
    assert check_real("x", value, positive=True) == 3.0 and check_seed("seed", value) == 3
    for bad in (True, np.bool_(True), torch.tensor(True)):
        with pytest.raises(ValueError, match="k must be a positive int"):
            check_int("k", bad, 1)
        with pytest.raises(ValueError, match="x must be a finite number"):
            check_real("x", bad)
    assert check_prob("w", np.float32(0.25)) == 0.25
    with pytest.raises(ValueError, match=r"w must be a finite number in \[0, 1\], got 1.5"):
        check_prob("w", 1.5)


def test_consistency_one_validator_module_fit_takes_numpy_scalars_and_refuses_negative_seeds_as_sample_does():
    """fit refused np.int64 steps that Posterior.sample accepts for n, and took seed=-1 that sample refuses."""
    prior = two_token_prior()
    post = pst.Posterior(prior, count_a(), beta=np.float64(1.0))
    run = fit(post, policy_from(prior, max_new_tokens=T), objective="dpg", steps=np.int64(2), batch_size=np.int32(4),
              lr=np.float32(0.1), max_new_tokens=torch.tensor(T), seed=np.uint64(2**64 - 1))  # fmt: skip
    assert len(run.metrics) == 2 and run.config["batch_size"] == 4 and type(run.config["lr"]) is float
    for seed in (-1, 2**64, True):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            post.sample(n=2, max_new_tokens=T, seed=seed)
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            fit(post, policy_from(prior, max_new_tokens=T), objective="dpg", steps=1, batch_size=4, lr=0.1,
                max_new_tokens=T, seed=seed)  # fmt: skip


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


def test_consistency_one_validator_module_generate_refuses_a_zero_inside_the_attention_mask():
    """A 0 between prompt tokens silently dropped that token from the prompt."""
    prior = tiny_hf_prior("llama")
    model, tok = prior.model, prior.tokenizer
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(ValueError, match=r"input row #1: attention_mask has a 0 at position 2, between prompt tokens"):
        pst.generate(model, tok, ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]]), reward=count_a(),
                     beta=0.5, max_new_tokens=2)  # fmt: skip
    out = pst.generate(model, tok, ids, attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), reward=count_a(),
                       beta=0.5, n=2, max_new_tokens=2)  # left padding is still padding  # fmt: skip
    assert out.sequences.shape[0] == 4


def test_consistency_one_validator_module_bert_folder_is_not_a_causal_lm(tmp_path):
    """An encoder folder loaded as a cache-less BertLMHeadModel and failed mid-sampling with
    "cannot gather rows of a NoneType cache"."""
    from transformers import BertConfig, BertForMaskedLM

    from posterior.priors.hf import HFPrior

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is not a transformers causal LM checkpoint: 'bert' is a bidirectional encoder"):
        HFPrior.from_pretrained(str(tmp_path))


def test_consistency_one_validator_module_classifier_refuses_a_folder_without_a_classification_head(tmp_path):
    """Classifier(<a causal LM folder>) scored with a randomly initialised head."""
    from posterior.rewards import Classifier

    prior = tiny_hf_prior("llama")
    prior.model.save_pretrained(tmp_path)
    prior.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is not a sequence classifier checkpoint: its classification head \['score"):
        Classifier(str(tmp_path), label=0)


def test_consistency_one_validator_module_mh_summary_says_why_r_hat_is_undefined():
    """One kept state per chain printed a bare NaN for R-hat."""
    post = pst.Posterior(two_token_prior(), count_a(), beta=1.0)
    res = post.sample(n=4, method="mh", max_new_tokens=T, seed=0, steps=2, burn_in=1)
    assert res.info["r_hat"] is None and "split R-hat needs >= 4 kept states per chain; this run kept 1" in res.info["r_hat_note"]
    text = res.format_summary()
    assert "NaN" not in text and "R-hat          undefined   split R-hat needs >= 4 kept states per chain" in text
    assert res.summary()["r_hat"] is None


# --------------------------------------------------------------------------------------------------
# 9. The default model cache is verified against the record written with it
# --------------------------------------------------------------------------------------------------
def test_default_model_cache_prefilled_or_altered_is_refused(tmp_path, monkeypatch):
    """A cache folder pre-filled by someone else was loaded without a check."""
    from posterior.priors import default as D

    monkeypatch.setenv("POSTERIOR_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    # a folder at the cache path with weights and a done.json but no record (an old or foreign cache)
    st = gguf.stat()
    key = D.hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{D.CACHE_FORMAT}".encode()).hexdigest()[:16]
    folder = D.cache_dir() / f"{gguf.stem}-{key}"
    folder.mkdir(parents=True)
    weights = folder / D.WEIGHTS
    weights.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    (folder / "done.json").write_text('{"gguf": "x", "size": 1}')
    with pytest.raises(CheckpointError, match="has no integrity record"):
        D._converted(gguf)  # never reaches the conversion
    # with its record, it verifies; any change to the weights or the GGUF file is refused
    D.write_record(folder, gguf, D.sha256_file(gguf))
    assert D._converted(gguf) == folder
    data = bytearray(weights.read_bytes())
    data[100] ^= 1  # inside the header MiB (the tensor index)
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not match its record: model.safetensors differs"):
        D._converted(gguf)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match=r"model.safetensors has \d+ bytes, \d+ were written"):
        D._converted(gguf)
    with pytest.raises(CheckpointError, match="made from another GGUF file"):
        D.verify_cache(folder, "0" * 64)


def test_output_details_training_metrics_name_their_estimates(tmp_path):
    """Issue 19 item 12: a metrics row's KL can be a negative estimate; every row says which fields
    are estimates (in the returned run and in metrics.jsonl)."""
    import json

    import posterior as pst
    from posterior.testing import markov_prior

    prior = markov_prior(seed=3)
    post = pst.Posterior(prior, pst.rewards.Callable(lambda ts: [float(t.count("a")) for t in ts]), beta=0.5)
    policy = pst.train.policy_from(prior, max_new_tokens=3)
    run = pst.train.fit(post, policy, objective="dpg", steps=2, batch_size=4, lr=0.05, max_new_tokens=3,
                        checkpoint_dir=tmp_path)  # fmt: skip
    for row in run.metrics:
        assert {"kl_target_forward", "kl_target_reverse", "kl_prior", "log_Z"} <= set(row["estimates"])
        assert "loss" not in row["estimates"] and "step" not in row["estimates"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["estimates"] == run.metrics[-1]["estimates"]
