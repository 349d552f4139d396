"""HFPrior's HIDDEN_STATES capability: the hidden states kept in decode states equal the ones of
one teacher-forced pass, through extend / select / reorder / truncate / merge_rows."""

import pytest
import torch

from posterior.priors.base import GRAD, HIDDEN_STATES, NEXT_TOKEN, decode_rows
from posterior.testing import tiny_hf_prior

ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def prior(request):
    return tiny_hf_prior(request.param)


def _prompts(prior):
    return prior.encode_prompts(["ab", "hello there"])  # different lengths: left padding is exercised


def _decode(prior, prompt_ids, N, T, seed):
    """Sample N×T continuations step by step keeping hidden states; returns tokens (P, N, T), lengths
    (P, N) and the hidden state (P, N, T, H) that each step's logprobs came from."""
    P = len(prompt_ids)
    g = torch.Generator().manual_seed(seed)
    state = prior.start(prompt_ids, copies=N, hidden=True)
    toks, hs = [], []
    for _ in range(T):
        hs.append(state.hidden.clone())
        tok = torch.multinomial(state.logprobs.exp(), 1, generator=g).squeeze(1)  # (B,)
        toks.append(tok)
        state = prior.extend(state, tok)
    tokens = torch.stack(toks, 1).view(P, N, T)
    return tokens, torch.stack(hs, 1).view(P, N, T, -1), state


def test_capabilities(prior):
    assert prior.has(HIDDEN_STATES) and prior.has(GRAD) and prior.has(NEXT_TOKEN)


def test_hidden_states_match_step_by_step_decode(prior):
    prompt_ids = _prompts(prior)
    tokens, stepwise, _ = _decode(prior, prompt_ids, N=3, T=6, seed=0)
    lengths = torch.tensor([[6, 4, 1], [6, 2, 5]])
    forced = prior.hidden_states(prompt_ids, tokens, lengths)  # (P, N, T, H)
    assert forced.shape == (2, 3, 6, prior.model.config.hidden_size)
    valid = torch.arange(6) < lengths[..., None]  # (P, N, T)
    torch.testing.assert_close(forced[valid], stepwise[valid], atol=ATOL, rtol=0)
    assert bool((forced[~valid] == 0).all())


def test_hidden_state_gives_the_logprobs(prior):
    """DecodeState.hidden is the vector the output embedding maps to the state's logits."""
    state = prior.start(_prompts(prior), copies=2, hidden=True)
    state = prior.extend(state, torch.tensor([3, 4, 5, 6]))
    with torch.inference_mode():  # state.hidden is an inference tensor (made under inference_mode)
        logits = prior.model.get_output_embeddings()(state.hidden)
    torch.testing.assert_close(torch.log_softmax(logits, -1), state.logprobs, atol=ATOL, rtol=0)


def test_hidden_is_off_by_default_and_logprobs_do_not_change(prior):
    prompt_ids = _prompts(prior)
    plain, kept = prior.start(prompt_ids, copies=2), prior.start(prompt_ids, copies=2, hidden=True)
    assert plain.hidden is None and kept.hidden.shape == (4, prior.model.config.hidden_size)
    tok = torch.tensor([3, 4, 5, 6])
    plain, kept = prior.extend(plain, tok), prior.extend(kept, tok)
    assert plain.hidden is None
    torch.testing.assert_close(plain.logprobs, kept.logprobs, atol=0, rtol=0)


def test_select_reorder_truncate_merge_carry_hidden(prior):
    prompt_ids = _prompts(prior)
    tokens, stepwise, state = _decode(prior, prompt_ids, N=2, T=5, seed=1)  # state after 5 tokens
    B = 4
    flat_tok = tokens.view(B, 5)
    rows_prompts = [prompt_ids[b // 2] for b in range(B)]
    idx = torch.tensor([3, 0, 0, 2])
    sel = prior.select(state, idx)
    # The hidden state after all 5 tokens, recomputed from scratch for the selected rows.
    fresh = prior.truncate(None, rows_prompts, torch.cat([flat_tok, flat_tok[:, :1]], 1), torch.full((B,), 5), hidden=True)
    torch.testing.assert_close(sel.hidden, fresh.hidden[idx], atol=ATOL, rtol=0)
    re = prior.reorder(prior.select(state, torch.arange(B)), idx)
    torch.testing.assert_close(re.hidden, sel.hidden, atol=0, rtol=0)

    keep = torch.tensor([0, 3, 5, 2])
    cut = prior.truncate(state, rows_prompts, flat_tok, keep)  # reuses the cache, keeps hidden (state has it)
    want = stepwise.view(B, 5, -1)
    for b, k in enumerate(keep.tolist()):  # state after the prompt + x_1:k is step k's (k = 5: the final state's)
        ref = state.hidden[b] if k == 5 else want[b, k]
        torch.testing.assert_close(cut.hidden[b], ref, atol=ATOL, rtol=0)
    with torch.inference_mode():
        logits = prior.model.get_output_embeddings()(cut.hidden)
    torch.testing.assert_close(torch.log_softmax(logits, -1), cut.logprobs, atol=ATOL, rtol=0)

    take = torch.tensor([True, False, True, False])
    merged = prior.merge_rows(take, cut, state)
    torch.testing.assert_close(merged.hidden, torch.where(take[:, None], cut.hidden, state.hidden), atol=0, rtol=0)
    with pytest.raises(ValueError, match="hidden"):
        prior.merge_rows(take, cut, prior.truncate(None, rows_prompts, flat_tok, keep))


def test_decode_rows_keeps_hidden_through_compaction(prior):
    """decode_rows drops finished rows (reorder) and merges parked ones back (merge_rows)."""
    prompt_ids = _prompts(prior)
    state = prior.start(prompt_ids, copies=4, hidden=True)
    budget = torch.tensor([1, 1, 1, 6, 1, 1, 1, 4])
    dec = decode_rows(prior, state, budget, generator=torch.Generator().manual_seed(0), keep_state=True)
    ext, final = dec.extension, dec.state
    B = budget.numel()
    # keep_state: every row has consumed all but its last new token
    consumed = (ext.lengths - 1).clamp(min=0)
    ref = prior.truncate(None, [prompt_ids[b // 4] for b in range(B)], ext.tokens, consumed, hidden=True)
    torch.testing.assert_close(final.hidden, ref.hidden, atol=ATOL, rtol=0)


def test_hidden_states_grad(prior):
    prompt_ids = _prompts(prior)
    tokens = torch.randint(3, 20, (2, 2, 3), generator=torch.Generator().manual_seed(0))
    lengths = torch.full((2, 2), 3)
    h = prior.hidden_states(prompt_ids, tokens, lengths, grad=True)
    assert h.requires_grad
    h.sum().backward()
    assert any(p.grad is not None for p in prior.model.parameters())
    prior.model.zero_grad(set_to_none=True)
    # without grad: an ordinary tensor that a trainable head can use in autograd
    w = torch.zeros(h.shape[-1], requires_grad=True)
    (prior.hidden_states(prompt_ids, tokens, lengths) @ w).sum().backward()
    assert w.grad is not None


def test_lora_policy_keeps_hidden_states(prior):
    """HFPolicy inherits the capability (its own _forward passes ``hidden`` through)."""
    from posterior.train.policy import policy_from

    policy = policy_from(prior, lora_rank=2)
    assert policy.has(HIDDEN_STATES)
    prompt_ids = _prompts(prior)
    tokens, stepwise, _ = _decode(policy, prompt_ids, N=2, T=3, seed=2)
    forced = policy.hidden_states(prompt_ids, tokens, torch.full((2, 2), 3))
    torch.testing.assert_close(forced, stepwise, atol=ATOL, rtol=0)
