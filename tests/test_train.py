"""Trained approximators of pi*: policies, pure losses on exact toys, the loop, resume after SIGKILL.

Exact answers come from enumerating a small support (``posterior.exact``): a tabular policy over
``two_token_prior`` (max_new_tokens 2: 7 sequences) for the loss gradients, and over
``markov_prior`` (max_new_tokens 3: 40 sequences) for training to convergence.
"""

import functools
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import posterior as pst
from conftest import a_minus_c, const_reward, count_a_reward
from posterior.exact import enumerate_continuations, exact_posterior
from posterior.testing import markov_prior, tiny_hf_prior, two_token_prior
from posterior.train import objectives as O
from posterior.train import policy_from
from posterior.train.checkpoint import latest_step, remove_temporaries, steps_of
from posterior.train.policy import TabularPolicy, load_policy
import numpy as np
from posterior.errors import CheckpointError
from posterior.rewards import Callable
from posterior.train import fit
from posterior.train import load_policy as load_policy_h19
from posterior.train.checkpoint import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
BETA = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def count_a(texts):
    return [float(t.count("a")) for t in texts]




# --- exact helpers -----------------------------------------------------------------------------
def support_batch(exact, prior):
    """Every support sequence as one (1, S, T) batch."""
    S, T = len(exact.sequences), max(len(s) for s in exact.sequences)
    tokens = torch.full((1, S, T), prior.eos_token_ids[0], dtype=torch.long)
    for i, s in enumerate(exact.sequences):
        tokens[0, i, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([[len(s) for s in exact.sequences]])
    return tokens, lengths


def exact_kl_target(policy, exact, M):
    """KL(pi* || q) by enumerating q."""
    seqs, lq = enumerate_continuations(policy, M)
    log_q = dict(zip(seqs, lq.tolist()))
    return float(sum(p.exp() * (p - log_q[s]) for s, p in zip(exact.sequences, exact.log_posterior.double())))


def q_of(policy, exact, M):
    seqs, lq = enumerate_continuations(policy, M)
    d = dict(zip(seqs, lq.exp().tolist()))
    return torch.tensor([d[s] for s in exact.sequences], dtype=torch.float64)


def random_policy(prior, M, seed=0):
    policy = policy_from(prior, max_new_tokens=M)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        policy.logits.add_(torch.randn(policy.logits.shape, generator=g, dtype=torch.float64))
    return policy


def expected_gradient(loss_fn, policy, prior, exact, *, N=2, **kw):
    """E over batches of N iid draws from q of grad loss, by enumerating all S^N batches."""
    tokens, lengths = support_batch(exact, prior)
    S = tokens.shape[1]
    with torch.no_grad():
        q = policy.log_prob([[]], tokens, lengths).double().exp()[0]  # (S,)
    log_pi0 = exact.log_prior.float()
    total = torch.zeros_like(policy.logits)
    for batch in itertools.product(range(S), repeat=N):
        idx = torch.tensor(batch)
        prob = float(q[idx].prod())
        log_q = policy.log_prob([[]], tokens[:, idx], lengths[:, idx], grad=True)  # (1, N)
        loss, _ = loss_fn(log_q, log_pi0[idx][None], exact.rewards[idx][None], BETA, **kw)
        (g,) = torch.autograd.grad(loss, policy.logits)
        total += prob * g
    return total


def exact_gradient(divergence, policy, prior, exact):
    """grad of divergence(log q (S,), log pi* (S,)) over the support, through the table."""
    tokens, lengths = support_batch(exact, prior)
    log_q = policy.log_prob([[]], tokens, lengths, grad=True)[0].double()  # (S,)
    (g,) = torch.autograd.grad(divergence(log_q, exact.log_posterior.double()), policy.logits)
    return g


def kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum()


def js(log_q, log_p):
    log_m = torch.logaddexp(log_q, log_p) - math.log(2)
    return 0.5 * kl(log_q, log_m) + 0.5 * kl(log_p, log_m)


def tv(log_q, log_p):
    return 0.5 * (log_q.exp() - log_p.exp()).abs().sum()


@pytest.fixture
def toy():
    prior = two_token_prior()
    post = pst.Posterior(prior, pst.rewards.Callable(count_a), beta=BETA)
    return prior, post, exact_posterior(prior, post.reward, BETA, 2)


# --- policies ----------------------------------------------------------------------------------
def test_tabular_policy_starts_at_the_prior_and_enumerates_like_it():
    prior = markov_prior(seed=3)
    policy = policy_from(prior, max_new_tokens=3)
    assert isinstance(policy, pst.Prior) and isinstance(policy, TabularPolicy)
    seqs0, lp0 = enumerate_continuations(prior, 3)
    seqs, lp = enumerate_continuations(policy, 3)
    assert seqs == seqs0 and torch.allclose(lp, lp0, atol=1e-6)
    cont = policy.sample([[]], 50, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cont.log_prob, prior.log_prob([[]], cont.tokens, cont.lengths), atol=1e-6)
    assert torch.allclose(policy.log_prob([[]], cont.tokens, cont.lengths), cont.log_prob, atol=1e-6)


def test_importance_sampling_with_the_policy_as_proposal(toy):
    """A policy is a Prior: IS with proposal=policy; at q = pi* every weight is equal (ESS = n)."""
    prior, post, exact = toy
    policy = policy_from(prior, max_new_tokens=2)
    policy.set_distribution(exact.sequences, exact.log_posterior)
    q = q_of(policy, exact, 2)
    assert torch.allclose(q, exact.log_posterior.exp(), atol=1e-6)
    res = post.sample(n=200, method="is", max_new_tokens=2, proposal=policy, seed=0)
    assert res.ess.item() == pytest.approx(200, rel=1e-4)
    assert res.log_Z.item() == pytest.approx(exact.log_Z, abs=1e-5)


def test_tabular_policy_errors_name_the_bad_value():
    prior = markov_prior()
    with pytest.raises(ValueError, match="needs max_new_tokens"):
        policy_from(prior)
    with pytest.raises(ValueError, match="lora_rank=4"):
        policy_from(prior, lora_rank=4, max_new_tokens=2)
    policy = policy_from(prior, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens=3 exceeds"):
        policy.sample([[]], 2, 3)
    with pytest.raises(ValueError, match="'ab'.*not one of the tabular policy's prompts"):
        policy.sample(policy.encode_prompts(["ab"]), 2, 2)
    with pytest.raises(ValueError, match="already a trainable policy"):
        policy_from(policy, max_new_tokens=2)


def test_policy_from_rejects_priors_without_gradients():
    class EnginePrior(pst.Prior):  # a sequence-level prior, as a serving engine is
        vocab_size = 3
        eos_token_ids = (2,)
        encode_prompts = encode_text = decode = continue_prefixes = token_log_probs = None

    with pytest.raises(ValueError, match="supports HFPrior and CallablePrior, got EnginePrior"):
        policy_from(EnginePrior())


@pytest.mark.parametrize("rank", [4, None])
def test_hf_policy_starts_at_the_prior_and_leaves_it_untouched(rank, tmp_path):
    prior = tiny_hf_prior("llama")
    rng = torch.random.get_rng_state()
    policy = policy_from(prior, lora_rank=rank)
    assert torch.equal(torch.random.get_rng_state(), rng)  # no hidden use of the global RNG
    twin = policy_from(prior, lora_rank=rank).trainable_state()
    assert all(torch.equal(v, twin[k]) for k, v in policy.trainable_state().items())
    assert isinstance(policy, pst.HFPrior) and policy.tokenizer is prior.tokenizer
    assert policy.eos_token_ids == prior.eos_token_ids and policy.chat == prior.chat
    ids = prior.encode_prompts(["hello"])
    cont = prior.sample(ids, 4, 6, generator=torch.Generator().manual_seed(0))
    lp0 = prior.log_prob(ids, cont.tokens, cont.lengths)
    assert torch.equal(policy.log_prob(ids, cont.tokens, cont.lengths), lp0)  # LoRA B = 0: q = pi0 exactly
    post = pst.Posterior(prior, pst.rewards.Callable(count_a), beta=BETA)
    pst.train.fit(post, policy, objective="dpg", steps=3, batch_size=4, lr=1e-2, max_new_tokens=6, prompts=["hello"])
    assert torch.equal(prior.log_prob(ids, cont.tokens, cont.lengths), lp0)  # the prior is not the policy
    moved = policy.log_prob(ids, cont.tokens, cont.lengths)
    assert not torch.allclose(moved, lp0)
    n_train = sum(p.numel() for p in policy.trainable_parameters())
    assert n_train < sum(p.numel() for p in prior.model.parameters()) if rank else n_train > 0
    loaded = load_policy(prior, policy.save(tmp_path / "saved"))
    assert torch.allclose(loaded.log_prob(ids, cont.tokens, cont.lengths), moved, atol=1e-6)
    assert (tmp_path / "saved" / ("adapter_config.json" if rank else "config.json")).is_file()


def test_tabular_save_and_load(tmp_path):
    prior = markov_prior()
    policy = random_policy(prior, 2)
    loaded = load_policy(prior, policy.save(tmp_path))
    assert torch.equal(loaded.logits, policy.logits)


def test_nan_policy_files_are_refused_at_load_naming_the_folder(tmp_path):
    """A policy saved with NaN weights (a damaged file, or a run saved after it diverged) loaded
    silently and sampled NaN log-probabilities everywhere (issue 25 item 11)."""
    from safetensors.torch import load_file, save_file

    from posterior.errors import CheckpointError

    prior = markov_prior()
    folder = random_policy(prior, 2).save(tmp_path / "tab")
    saved = torch.load(folder / "tabular_policy.pt")
    torch.save({**saved, "logits": saved["logits"].masked_fill(saved["logits"] > 0, float("-inf"))}, folder / "tabular_policy.pt")
    assert load_policy(prior, folder) is not None  # a -inf logit: a token never drawn
    torch.save({**saved, "logits": saved["logits"].masked_fill(saved["logits"] > 0, float("nan"))}, folder / "tabular_policy.pt")
    with pytest.raises(CheckpointError, match=f"tabular policy folder {folder} holds \\d+ non-finite value\\(s\\) \\(nan\\)"):
        load_policy(prior, folder)

    hf = tiny_hf_prior("gpt2")
    lora = policy_from(hf, lora_rank=2).save(tmp_path / "lora")
    weights = lora / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[0]
    save_file({**state, key: torch.full_like(state[key], float("nan"))}, str(weights))
    with pytest.raises(CheckpointError, match=f"policy folder {lora} holds \\d+ non-finite value\\(s\\) \\(nan\\)"):
        load_policy(hf, lora)
    full = policy_from(hf).save(tmp_path / "full")
    weights = full / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in sorted(state) if state[k].is_floating_point())
    save_file({**state, key: torch.full_like(state[key], float("inf"))}, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"policy folder {full} holds \\d+ non-finite value\\(s\\) \\(inf\\)"):
        load_policy(hf, full)


# --- pure losses on exact toys -----------------------------------------------------------------
def test_rloo_reverse_kl_gradient_is_beta_times_the_exact_reverse_kl_gradient(toy):
    prior, _, exact = toy
    policy = random_policy(prior, 2)
    got = expected_gradient(O.reverse_kl_loss, policy, prior, exact)
    want = BETA * exact_gradient(kl, policy, prior, exact)
    assert want.abs().max() > 0.01
    assert torch.allclose(got, want, atol=1e-5)


def test_dpg_gradient_with_exact_log_Z_is_the_exact_forward_kl_gradient(toy):
    prior, _, exact = toy
    policy = random_policy(prior, 2)
    got = expected_gradient(O.forward_kl_loss, policy, prior, exact, log_Z=exact.log_Z)
    want = exact_gradient(lambda lq, lp: kl(lp, lq), policy, prior, exact)
    assert want.abs().max() > 0.01
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name, divergence", [("js", js), ("tv", tv)])
def test_f_dpg_gradient_with_exact_log_Z_is_the_exact_divergence_gradient(toy, name, divergence):
    prior, _, exact = toy
    policy = random_policy(prior, 2, seed=1)
    got = expected_gradient(O.get_objective(name).loss, policy, prior, exact, log_Z=exact.log_Z)
    want = exact_gradient(divergence, policy, prior, exact)
    assert want.abs().max() > 0.01
    assert torch.allclose(got, want, atol=1e-5)


def test_reward_gradient_is_the_exact_expected_reward_gradient(toy):
    prior, _, exact = toy
    policy = random_policy(prior, 2)
    got = expected_gradient(O.reward_loss, policy, prior, exact)
    want = exact_gradient(lambda lq, lp: -(lq.exp() * exact.rewards).sum(), policy, prior, exact)
    assert torch.allclose(got, want, atol=1e-5)


def test_at_pi_star_the_kl_objectives_are_stationary_and_reward_is_not(toy):
    """reverse_kl's fixed point is pi*: at q = pi*, R = beta log Z for every sequence, so every
    batch's coefficients vanish (not only their mean); plain reward maximisation keeps pushing."""
    prior, post, exact = toy
    policy = policy_from(prior, max_new_tokens=2)
    policy.set_distribution(exact.sequences, exact.log_posterior)
    cont = policy.sample([[]], 64, 2, generator=torch.Generator().manual_seed(0))
    log_q = policy.log_prob([[]], cont.tokens, cont.lengths, grad=True)
    log_pi0, r = prior.log_prob([[]], cont.tokens, cont.lengths), post.rewards(cont.texts)
    for name in ("reverse_kl", "forward_kl"):
        _, info = O.get_objective(name).loss(log_q, log_pi0, r, BETA)
        assert info.coefficient.abs().max() < 1e-5, name
        if name == "reverse_kl":
            assert torch.allclose(info.pseudo_reward, torch.full_like(info.pseudo_reward, BETA * exact.log_Z), atol=1e-5)
    # (TV is not differentiable at q = pi*: sign(log q - log pi*) there is rounding noise.)
    for name in ("reverse_kl", "forward_kl", "js"):
        kw = {"log_Z": exact.log_Z} if name in ("js", "forward_kl") else {}
        g = expected_gradient(O.get_objective(name).loss, policy, prior, exact, **kw)
        assert g.abs().max() < 1e-5, name
    g_reward = expected_gradient(O.reward_loss, policy, prior, exact)
    assert g_reward.abs().max() > 0.05


def test_losses_on_hard_constraints():
    log_q = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)).requires_grad_()
    log_pi0 = log_q.detach().clone()
    r = torch.tensor([[0.0, -math.inf, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="sample 1 of prompt 0 has reward or log pi0 -inf"):
        O.reverse_kl_loss(log_q, log_pi0, r, BETA)
    with pytest.raises(ValueError, match="sample 1 of prompt 0"):
        O.reward_loss(log_q, log_pi0, r, BETA)
    loss, info = O.forward_kl_loss(log_q, log_pi0, r, BETA)
    assert info.pseudo_reward[0, 1] == 0 and torch.isfinite(loss)
    none = torch.full_like(r, -math.inf)  # no sample satisfies the constraint: no gradient, no NaN
    loss, info = O.forward_kl_loss(log_q, log_pi0, none, BETA)
    assert torch.equal(info.coefficient, torch.zeros_like(r)) and loss.item() == 0.0
    for fn in (O.js_loss, O.tv_loss):
        loss, info = fn(log_q, log_pi0, r, BETA, log_Z=0.3)
        assert torch.isfinite(info.pseudo_reward).all() and torch.isfinite(loss)
    assert O.js_loss(log_q, log_pi0, r, BETA, log_Z=0.3)[1].pseudo_reward[0, 1].item() == pytest.approx(-0.5 * math.log(2))


def test_loss_input_errors():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="at least 2 samples per prompt, got 1"):
        O.reverse_kl_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), BETA)
    with pytest.raises(ValueError, match="share a \\(P, N\\) shape"):
        O.reverse_kl_loss(x, torch.zeros(1, 2), x, BETA)
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0"):
        O.forward_kl_loss(x, x, x, 0)
    with pytest.raises(ValueError, match="f-DPG needs log_Z"):
        O.js_loss(x, x, x, BETA)
    with pytest.raises(ValueError, match="rewards has NaN"):
        O.reverse_kl_loss(x, x, torch.tensor([[0.0, math.nan, 0.0]]), BETA)
    with pytest.raises(ValueError, match="log_weights must be normalised"):
        O.distill_loss(x, x)
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        O.get_objective("ppo")
    assert O.get_objective("rl").name == "reverse_kl" and O.get_objective("dpg").name == "forward_kl"


def test_distill_loss_is_weighted_negative_log_likelihood():
    log_q = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).requires_grad_()
    lw = torch.log(torch.tensor([[0.7, 0.3, 0.0]]))
    loss, _ = O.distill_loss(log_q, lw)
    assert loss.item() == pytest.approx(-(0.7 * math.log(0.5) + 0.3 * math.log(0.3)), rel=1e-6)


# --- training to the exact posterior -----------------------------------------------------------
CONVERGE = dict(batch_size=16, lr=0.05, max_new_tokens=3, seed=0)
BUDGET = {"reverse_kl": 120, "forward_kl": 120, "js": 120, "tv": 120, "distill": 200}  # optimiser steps


@pytest.fixture(scope="module")
def markov():
    prior = markov_prior(seed=3)
    post = pst.Posterior(prior, pst.rewards.Callable(a_minus_c), beta=BETA)
    return prior, post, exact_posterior(prior, post.reward, BETA, 3)


@pytest.mark.parametrize("objective", sorted(BUDGET))
def test_each_objective_drives_the_exact_kl_to_target_below_a_quarter(markov, objective):
    """Budget: BUDGET[objective] Adam steps of 16 samples (lr 0.05) from KL(pi*||pi0) = 2.05."""
    prior, post, exact = markov
    policy = policy_from(prior, max_new_tokens=3)
    start = exact_kl_target(policy, exact, 3)
    assert start == pytest.approx(exact.kl, rel=1e-5)
    run = pst.train.fit(post, policy, objective=objective, steps=BUDGET[objective], **CONVERGE)
    end = exact_kl_target(policy, exact, 3)
    assert end <= start / 4, (objective, start, end)
    assert len(run.metrics) == BUDGET[objective] and run.final["step"] == BUDGET[objective]
    if objective != "distill":  # running log Z (IS over every batch) near the enumerated value
        assert run.final["log_Z"] == pytest.approx(exact.log_Z, abs=0.1)


def test_distill_on_resampled_importance_samples_trains(markov):
    """The other distillation path: IS draws of pi*, resampled by weight (200 steps; the weighted
    SMC path is the one held to the quarter bound above)."""
    prior, post, exact = markov
    policy = policy_from(prior, max_new_tokens=3)
    pst.train.fit(post, policy, objective="distill", steps=200, distill_method="is", distill_resample=True, **CONVERGE)
    assert exact_kl_target(policy, exact, 3) < exact.kl / 2


def test_reward_objective_collapses_onto_the_argmax_while_reverse_kl_does_not(markov):
    prior, post, exact = markov
    best = int(exact.rewards.argmax())
    assert (exact.rewards == exact.rewards[best]).sum() == 1  # a unique argmax ("aaa")
    runs = {}
    for objective in ("reward", "reverse_kl"):
        policy = policy_from(prior, max_new_tokens=3)
        pst.train.fit(post, policy, objective=objective, steps=200, **CONVERGE)
        runs[objective] = (q_of(policy, exact, 3), exact_kl_target(policy, exact, 3))
    p_best = exact.log_posterior.exp()[best].item()
    (q_reward, kl_reward), (q_rl, kl_rl) = runs["reward"], runs["reverse_kl"]
    assert q_reward[best] > 0.95 and p_best < 0.6  # collapse onto the argmax, which pi* does not do
    assert abs(q_rl[best].item() - p_best) < 0.05
    assert kl_reward > exact.kl / 4 and kl_rl < exact.kl / 20


# --- the loop: metrics, resume, accelerate -----------------------------------------------------
def test_metrics_lines_and_progress(markov, tmp_path, capsys):
    prior, post, _ = markov
    policy = policy_from(prior, max_new_tokens=3)
    run = pst.train.fit(post, policy, objective="js", steps=5, checkpoint_dir=tmp_path, progress=True, **CONVERGE)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5]
    for key in ("reward_mean", "kl_prior", "kl_target_forward", "kl_target_reverse", "ess", "log_Z", "loss"):
        assert all(isinstance(l[key], float) for l in lines), key
    assert lines == [{**m} for m in run.metrics]
    assert "train js" in capsys.readouterr().err


def _weights_after(post, prior, objective, steps, checkpoint_dir=None, **kw):
    policy = policy_from(prior, max_new_tokens=3)
    run = pst.train.fit(post, policy, objective=objective, steps=steps, checkpoint_dir=checkpoint_dir, **{**CONVERGE, **kw})
    return policy.logits.detach().clone(), run


@pytest.mark.parametrize("objective", ["reverse_kl", "js", "distill"])
def test_resume_in_process_ends_bit_for_bit(markov, tmp_path, objective):
    prior, post, _ = markov
    want, full = _weights_after(post, prior, objective, 12)
    _weights_after(post, prior, objective, 5, tmp_path, checkpoint_every=2)  # stops at 5 (checkpoints 2, 4, 5)
    got, resumed = _weights_after(post, prior, objective, 12, tmp_path, checkpoint_every=2)
    assert resumed.resumed_from == 5
    assert torch.equal(got, want)
    assert torch.equal(resumed.log_Z, full.log_Z)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(resumed.metrics) == strip(full.metrics)
    assert sorted(steps_of(tmp_path)[0]) == [10, 12]  # the last two are kept


def test_resume_refuses_other_settings(markov, tmp_path):
    prior, post, _ = markov
    _weights_after(post, prior, "js", 2, tmp_path)
    with pytest.raises(ValueError, match="other settings.*lr: 0.05 -> 0.1"):
        _weights_after(post, prior, "js", 4, tmp_path, lr=0.1)
    with pytest.raises(ValueError, match="checkpoint at step 2, beyond steps=1"):
        _weights_after(post, prior, "js", 1, tmp_path)


def test_temporary_files_of_a_killed_write_are_ignored(tmp_path):
    (tmp_path / "checkpoint-rank0-step00000004.pt").write_bytes(b"x")
    (tmp_path / ".checkpoint-rank0-step00000006.pt.tmp123").write_bytes(b"torn")
    assert latest_step(tmp_path, 1) == 4
    assert latest_step(tmp_path, 2) is None  # rank 1 has no checkpoint
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-rank0-step00000004.pt"]


def test_an_accelerator_on_the_cpu_changes_nothing(markov):
    from accelerate import Accelerator

    prior, post, _ = markov
    want, _ = _weights_after(post, prior, "reverse_kl", 6)
    got, _ = _weights_after(post, prior, "reverse_kl", 6, accelerator=Accelerator(cpu=True))
    assert torch.equal(got, want)


def test_fit_input_errors(markov):
    prior, post, _ = markov
    policy = policy_from(prior, max_new_tokens=3)
    kw = dict(steps=2, batch_size=4, lr=0.1, max_new_tokens=3)
    with pytest.raises(ValueError, match="batch_size must be an int >= 2, got 1"):
        pst.train.fit(post, policy, objective="rl", **{**kw, "batch_size": 1})
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -1"):
        pst.train.fit(post, policy, objective="rl", **{**kw, "lr": -1})
    with pytest.raises(ValueError, match="policy must come from posterior.train.policy_from"):
        pst.train.fit(post, prior, objective="rl", **kw)
    with pytest.raises(ValueError, match="max_new_tokens=4 exceeds"):
        pst.train.fit(post, policy, objective="rl", **{**kw, "max_new_tokens": 4})
    other = policy_from(two_token_prior(), max_new_tokens=3)
    with pytest.raises(ValueError, match="different tokenizer/vocabulary"):
        pst.train.fit(post, other, objective="rl", **kw)


def test_fit_config_and_keywords_train_bit_for_bit_alike(markov, tmp_path):
    """fit(post, policy, FitConfig(...)) is fit(post, policy, **keywords): one list of settings,
    the same draws and weights; keywords given with a config replace its fields."""
    prior, post, _ = markov
    kw = dict(objective="js", steps=6, **CONVERGE)
    a, b, c = (policy_from(prior, max_new_tokens=3) for _ in range(3))
    run_a = pst.train.fit(post, a, **kw)
    run_b = pst.train.fit(post, b, pst.train.FitConfig(**kw))
    run_c = pst.train.fit(post, c, pst.train.FitConfig(**{**kw, "lr": 0.5, "steps": 1}), lr=kw["lr"], steps=6)
    for policy in (b, c):
        assert torch.equal(policy.logits, a.logits)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(run_b.metrics) == strip(run_c.metrics) == strip(run_a.metrics)
    assert run_b.config == run_a.config


def test_fit_config_refuses_bad_values_naming_the_field():
    from posterior.train.config import FitConfig, identity_fields

    base = dict(objective="dpg", max_new_tokens=3)
    bad = [
        ({"objective": "nope"}, "unknown objective 'nope'"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
        ({"steps": 0}, "steps must be a positive int, got 0"),
        ({"batch_size": 1}, "batch_size must be an int >= 2, got 1"),  # dpg is on-policy: leave-one-out
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"prompts": []}, "prompts is an empty list"),
        ({"seed": -1}, "seed"),
        ({"checkpoint_every": 0}, "checkpoint_every must be a positive int, got 0"),
        ({"progress": "yes"}, "progress"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be a finite number > 0"),
        ({"distill_method": "mh"}, "distill_method"),
        ({"distill_resample": 1}, "distill_resample"),
        ({"sampler_options": [("ess_threshold", 0.5)]}, "sampler_options must be a dict"),
        ({"allow_changes": ("lr_typo",)}, r"allow_changes names unknown field\(s\) \['lr_typo'\]"),
        ({"checkpoint_dir": 3}, "checkpoint_dir must be a path"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            FitConfig(**{**base, **change})
    assert FitConfig(**{**base, "objective": "distill"}, batch_size=1).batch_size == 1  # off-policy: one sample suffices
    cfg = FitConfig(**base, prompts="hi", lr=torch.tensor(0.5))
    assert cfg.prompts == ("hi",) and type(cfg.lr) is float  # normalised once
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['step'\]"):
        pst.train.fit(pst.Posterior(two_token_prior(), count_a, beta=1.0), None, objective="dpg", step=3)
    assert set(identity_fields()) == {"trains", "objective", "batch_size", "lr", "max_new_tokens", "prompts", "seed", "beta",
                                      "max_grad_norm", "world_size", "distill_method", "distill_resample", "sampler_options",
                                      "prior", "reward", "policy"}  # what a checkpoint's config records  # fmt: skip


# --- SIGKILL and resume ------------------------------------------------------------------------
TABULAR_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
import posterior as pst
from posterior.testing import markov_prior
def slow(texts):
    time.sleep(0.02)  # so the parent can kill the run mid-way
    return [float(t.count("a")) - 0.5 * float(t.count("c")) for t in texts]
prior = markov_prior(seed=3)
post = pst.Posterior(prior, pst.rewards.Callable(slow), beta=0.5)
policy = pst.train.policy_from(prior, max_new_tokens=3)
pst.train.fit(post, policy, objective=sys.argv[2], steps=int(sys.argv[3]), batch_size=16, lr=0.05,
              max_new_tokens=3, seed=0, checkpoint_dir=sys.argv[1], checkpoint_every=3)
"""

HF_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
import posterior as pst
from posterior.testing import tiny_hf_prior
def slow(texts):
    time.sleep(0.15)
    return [float(t.count("a")) for t in texts]
prior = tiny_hf_prior("gpt2")
post = pst.Posterior(prior, pst.rewards.Callable(slow), beta=0.5)
policy = pst.train.policy_from(prior, lora_rank=4)
pst.train.fit(post, policy, objective=sys.argv[2], steps=int(sys.argv[3]), batch_size=4, lr=1e-2,
              max_new_tokens=5, prompts=["hi"], seed=0, checkpoint_dir=sys.argv[1], checkpoint_every=2)
"""


def run_and_kill(script: str, directory: Path, objective: str, steps: int, kill_after_step: int):
    """Start the script, SIGKILL it once a checkpoint at >= kill_after_step exists; return the
    last step it logged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(directory), objective, str(steps)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while (latest_step(directory, 1) or 0) < kill_after_step:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint within 120 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    logged = [json.loads(l)["step"] for l in (directory / "metrics.jsonl").read_text().splitlines() if l.endswith("}")]
    return max(logged)


def test_sigkill_mid_run_then_resume_ends_bit_for_bit_tabular(markov, tmp_path):
    prior, _, _ = markov
    post = pst.Posterior(prior, pst.rewards.Callable(a_minus_c), beta=BETA)
    steps = 40
    killed_at = run_and_kill(TABULAR_SCRIPT, tmp_path, "forward_kl", steps, kill_after_step=9)
    assert killed_at < steps
    resumed_at = latest_step(tmp_path, 1)
    policy = policy_from(prior, max_new_tokens=3)
    # the script's reward is a_minus_c under another name (it sleeps so the run can be killed): the
    # same values on every probe text, so only reward.name differs, and is allowed on purpose
    run = pst.train.fit(post, policy, objective="forward_kl", steps=steps, checkpoint_dir=tmp_path, checkpoint_every=3,
                        allow_changes=("reward.name",), **CONVERGE)  # fmt: skip
    assert run.resumed_from == resumed_at and 9 <= resumed_at < steps
    want, _ = _weights_after(post, prior, "forward_kl", steps)
    assert torch.equal(policy.logits, want)
    assert [m["step"] for m in run.metrics] == list(range(1, steps + 1))  # each step logged once


def test_sigkill_mid_run_then_resume_ends_bit_for_bit_lora(tmp_path):
    prior = tiny_hf_prior("gpt2")
    post = pst.Posterior(prior, pst.rewards.Callable(count_a), beta=BETA)
    steps = 8
    killed_at = run_and_kill(HF_SCRIPT, tmp_path, "reverse_kl", steps, kill_after_step=2)
    assert killed_at < steps
    kw = dict(objective="reverse_kl", steps=steps, batch_size=4, lr=1e-2, max_new_tokens=5, prompts=["hi"], seed=0)
    policy = policy_from(prior, lora_rank=4)
    # count_a under the script's name "slow": only reward.name differs (see the tabular test)
    run = pst.train.fit(post, policy, checkpoint_dir=tmp_path, checkpoint_every=2, allow_changes=("reward.name",), **kw)
    assert run.resumed_from is not None and run.resumed_from >= 2
    fresh = policy_from(prior, lora_rank=4)
    pst.train.fit(post, fresh, **kw)
    got, want = policy.trainable_state(), fresh.trainable_state()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)  # it trained


# --- TRL bridge --------------------------------------------------------------------------------
def test_trl_reward_function_and_beta():
    post = pst.Posterior(two_token_prior(), pst.rewards.Callable(count_a), beta=0.25)
    fn, beta = pst.train.trl_reward(post)
    assert beta == 0.25
    assert fn(prompts=["p", "p"], completions=["aab", "b"], extra_column=[1, 2]) == [2.0, 0.0]
    assert fn(prompts=["p"], completions=[[{"role": "assistant", "content": "aa"}]]) == [2.0]
    hard = pst.Posterior(two_token_prior(), pst.rewards.Contains("a"), beta=1.0)
    fn, _ = pst.train.trl_reward(hard)
    with pytest.raises(ValueError, match="is -inf for completion 'b'"):
        fn(prompts=["p"], completions=["b"])


@pytest.mark.slow
def test_trl_rloo_trainer_runs_on_the_bridge(tmp_path):
    """Slow because importing TRL takes ~30 s here, not because of the default model. Runs the
    example's TRL RLOO trainer for 2 steps on a tiny model, then uses the result as an IS proposal."""
    pytest.importorskip("trl")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from trl_rloo import train_with_trl
    finally:
        sys.path.pop(0)
    from posterior.train.policy import HFPolicy

    prior = tiny_hf_prior("llama")
    post = pst.Posterior(prior, pst.rewards.Callable(count_a), beta=0.2)
    before = prior.log_prob(*_probe(prior))
    model, logs = train_with_trl(post, ["hello"], steps=2, max_new_tokens=5, output_dir=str(tmp_path), lr=1e-2)
    assert any("kl" in entry for entry in logs)  # TRL applied the beta-weighted KL penalty
    assert torch.equal(prior.log_prob(*_probe(prior)), before)  # the prior's modules are untouched
    tuned = HFPolicy(model, prior, lora=True)
    res = post.sample(n=8, method="is", max_new_tokens=5, prompts=["hello"], proposal=tuned)
    assert torch.isfinite(res.log_Z).all()


def _probe(prior):
    ids = prior.encode_prompts(["hello"])
    cont = prior.sample(ids, 4, 5, generator=torch.Generator().manual_seed(0))
    return ids, cont.tokens, cont.lengths


DDP_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
import posterior as pst
from posterior.testing import tiny_hf_prior
prior = tiny_hf_prior("gpt2")
post = pst.Posterior(prior, pst.rewards.Callable(lambda ts: [float(t.count("a")) for t in ts]), beta=0.5)
policy = pst.train.policy_from(prior, lora_rank=4)
run = pst.train.fit(post, policy, objective="rl", steps=int(sys.argv[2]), batch_size=4, lr=1e-2, max_new_tokens=5,
                    prompts=["hi"], checkpoint_dir=sys.argv[1], checkpoint_every=2)
torch.save(policy.trainable_state(), os.path.join(sys.argv[1], f"final-rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_train_data_parallel_and_resume_bit_for_bit(tmp_path):
    """Slow: three launches of two CPU processes, each importing torch and peft. Under torchrun the
    loop builds an Accelerator (gloo), DDP keeps the ranks' weights equal, every rank checkpoints,
    and a resumed two-process run ends where an uninterrupted one does."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def launch(directory, steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(directory), str(steps)]  # fmt: skip
        out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return [torch.load(directory / f"final-rank{r}.pt") for r in (0, 1)]

    first = launch(tmp_path / "a", 4)
    assert sorted(steps_of(tmp_path / "a")) == [0, 1]  # each rank wrote its own checkpoints
    resumed = launch(tmp_path / "a", 6)
    fresh = launch(tmp_path / "b", 6)
    for states in (first, resumed, fresh):
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # ranks agree
    assert all(torch.equal(resumed[0][k], fresh[0][k]) for k in fresh[0])
    assert not all(torch.equal(first[0][k], fresh[0][k]) for k in fresh[0])
    assert [json.loads(l)["step"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_lora_policy_on_the_default_model_starts_at_pi0_and_trains():
    prior = pst.load_default_prior()
    policy = policy_from(prior, lora_rank=4)
    ids = prior.encode_prompts(["The movie was"])
    cont = prior.sample(ids, 4, 8, generator=torch.Generator().manual_seed(0))
    lp0 = prior.log_prob(ids, cont.tokens, cont.lengths)
    assert torch.equal(policy.log_prob(ids, cont.tokens, cont.lengths), lp0)
    post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=0.1)
    run = pst.train.fit(post, policy, objective="dpg", steps=2, batch_size=4, lr=1e-3, max_new_tokens=8,
                        prompts=["The movie was"])  # fmt: skip
    assert [m["step"] for m in run.metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in run.metrics)
    assert torch.equal(prior.log_prob(ids, cont.tokens, cont.lengths), lp0)
    assert not torch.equal(policy.log_prob(ids, cont.tokens, cont.lengths), lp0)


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening2.py (issue 19, hardening round two); each test is named after the failure it pins down
# --------------------------------------------------------------------------------------------------
T = 3  # two_token_prior at max_new_tokens=3: 15 continuations


count_a_h19 = functools.partial(count_a_reward, name="count_a")


const = functools.partial(const_reward, name="const")


def _fit(directory, *, prior=None, reward=None, beta=1.0, objective="forward_kl", steps=2, prompts=None, **kw):
    prior = prior or two_token_prior()
    post = pst.Posterior(prior, reward or count_a_h19(), beta=beta)
    policy = policy_from(prior, max_new_tokens=T, prompts=prompts)
    args = dict(steps=steps, batch_size=4, lr=0.1, max_new_tokens=T, checkpoint_dir=directory, checkpoint_every=1)
    return fit(post, policy, objective=objective, prompts=prompts, **{**args, **kw})


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


@pytest.mark.parametrize("change, field", [
    (dict(reward=count_a_h19(2.0)), "reward.fingerprint"),  # same name, other values
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
        fit(pst.Posterior(prior, count_a_h19(), beta=1.0), policy_from(prior, lora_rank=2), **{**kw, "steps": steps})
    prior = tiny_hf_prior("gpt2", seed=1)
    with pytest.raises(ValueError, match=r"prior\.fingerprint"):
        fit(pst.Posterior(prior, count_a_h19(), beta=1.0), policy_from(prior, lora_rank=2), **{**kw, "steps": 3})
    with pytest.raises(ValueError, match=r"policy\.kind: 'lora' -> 'full'"):
        prior = tiny_hf_prior("gpt2", seed=0)
        fit(pst.Posterior(prior, count_a_h19(), beta=1.0), policy_from(prior), **{**kw, "steps": 3})


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
        load_policy_h19(prior, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is empty"):
        load_policy_h19(prior, tmp_path / "empty")
    saved = policy_from(prior, max_new_tokens=T).save(tmp_path / "tab")
    _damage(saved / "tabular_policy.pt", "truncated")
    with pytest.raises(CheckpointError, match="tabular_policy.pt is truncated"):
        load_policy_h19(prior, saved)
    hf = tiny_hf_prior("gpt2")
    saved = policy_from(hf, lora_rank=2).save(tmp_path / "lora")
    _damage(saved / "adapter_model.safetensors", "garbage")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_policy_h19(hf, saved)


def test_consistency_one_validator_module_fit_takes_numpy_scalars_and_refuses_negative_seeds_as_sample_does():
    """fit refused np.int64 steps that Posterior.sample accepts for n, and took seed=-1 that sample refuses."""
    prior = two_token_prior()
    post = pst.Posterior(prior, count_a_h19(), beta=np.float64(1.0))
    run = fit(post, policy_from(prior, max_new_tokens=T), objective="dpg", steps=np.int64(2), batch_size=np.int32(4),
              lr=np.float32(0.1), max_new_tokens=torch.tensor(T), seed=np.uint64(2**64 - 1))  # fmt: skip
    assert len(run.metrics) == 2 and run.config["batch_size"] == 4 and type(run.config["lr"]) is float
    for seed in (-1, 2**64, True):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            post.sample(n=2, max_new_tokens=T, seed=seed)
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            fit(post, policy_from(prior, max_new_tokens=T), objective="dpg", steps=1, batch_size=4, lr=0.1,
                max_new_tokens=T, seed=seed)  # fmt: skip


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
