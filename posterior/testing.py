"""Small offline models for tests and examples: nothing here downloads anything.

``tiny_hf_prior`` builds a randomly initialised transformers causal LM (GPT-2 or Llama) from a
config with a character-level tokenizer made in memory. ``two_token_prior`` and ``markov_prior``
are exact ``CallablePrior``s whose posteriors can be enumerated with :mod:`posterior.exact`;
``SequencePrior`` hides a prior's step-wise capability (a stand-in for a serving engine).

Conformance (as genlm-control's ``PotentialTests``): a new prior runs
:func:`check_prior_conformance`, a new twist :func:`check_twist_conformance`. Each asserts what
every sampler relies on, with exact checks where the support can be enumerated, and raises
``AssertionError`` naming the broken property.
"""

from __future__ import annotations

import math
import string

import torch

from posterior.priors.base import HIDDEN_STATES, NEXT_TOKEN, STREAM, Prior
from posterior.priors.callable import CallablePrior

CHARS = list(string.ascii_lowercase + " .,!?'")


def char_tokenizer(chars=CHARS):
    """A character-level ``PreTrainedTokenizerFast`` with ``<bos>``, ``<eos>`` and ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_hf_prior(arch: str = "gpt2", *, seed: int = 0, layers: int = 2, width: int = 32, context: int = 128, chars=CHARS, **prior_kw):
    """A tiny randomly initialised causal LM (``arch`` "gpt2" or "llama") wrapped as ``HFPrior``.

    ``chars`` sets the vocabulary (plus ``<unk>``, ``<bos>``, ``<eos>``): e.g. ``chars="ab"`` gives a
    5-token model whose continuations can be enumerated (``posterior.exact``)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from posterior.priors.hf import HFPrior

    tok = char_tokenizer(list(chars))
    V = len(tok)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=context, n_embd=width, n_layer=layers, n_head=2,
                         bos_token_id=1, eos_token_id=2)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2)
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
    torch.manual_seed(seed)  # weight init of a throwaway test model; samplers never use global RNG
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # sharpen the EOS logit so sequences end at varied lengths
        model.get_output_embeddings().weight[2] *= 3.0
    return HFPrior(model, tok, **prior_kw)


def two_token_prior(probs=(0.5, 0.3, 0.2)) -> CallablePrior:
    """Vocab ["a", "b", <eos>]: every step draws from the same ``probs`` (independent of prefix)."""
    lp = torch.tensor(probs, dtype=torch.float64).log().float()

    def next_logprobs(ids: torch.Tensor) -> torch.Tensor:
        return lp.expand(ids.shape[0], -1)

    return CallablePrior(["a", "b", "<eos>"], next_logprobs)


def markov_prior(vocab=("a", "b", "c", "<eos>"), seed: int = 0) -> CallablePrior:
    """A random first-order Markov chain over ``vocab`` (last = EOS), conditioned on the last token."""
    g = torch.Generator().manual_seed(seed)
    V = len(vocab)
    table = torch.log_softmax(torch.randn(V + 1, V, generator=g, dtype=torch.float64), -1).float()  # row V: start

    def next_logprobs(ids: torch.Tensor) -> torch.Tensor:
        last = ids[:, -1] if ids.shape[1] else torch.full((ids.shape[0],), V, dtype=torch.long)
        return table[last]

    return CallablePrior(list(vocab), next_logprobs)


class SequencePrior(Prior):
    """Only the sequence-level capability of ``inner`` (no decode state): how a serving engine
    looks to the samplers. Used to test block SMC, MH and the other methods on such priors
    exactly, with ``inner``'s enumerable posterior. ``calls`` counts continue_prefixes calls."""

    def __init__(self, inner: Prior):
        self.inner = inner
        self.temperature, self.top_k, self.top_p = inner.temperature, inner.top_k, inner.top_p
        self.calls = 0

    vocab_size = property(lambda self: self.inner.vocab_size)
    eos_token_ids = property(lambda self: self.inner.eos_token_ids)
    max_length = property(lambda self: self.inner.max_length)

    def encode_prompts(self, prompts):
        return self.inner.encode_prompts(prompts)

    def encode_text(self, text):
        return self.inner.encode_text(text)

    def decode(self, token_ids):
        return self.inner.decode(token_ids)

    def vocabulary_key(self):
        return self.inner.vocabulary_key()

    def continue_prefixes(self, prompt_ids, prefixes, max_tokens, *, generator=None):
        self.calls += 1
        return self.inner.continue_prefixes(prompt_ids, prefixes, max_tokens, generator=generator)

    def token_log_probs(self, prompt_ids, tokens, lengths, *, grad=False):
        return self.inner.token_log_probs(prompt_ids, tokens, lengths, grad=grad)


class StreamingPrior(SequencePrior):
    """A :class:`SequencePrior` that also streams (``STREAM``): its streams are
    :class:`~posterior.priors.stream.DrawAhead` over ``inner`` showing ``lag`` tokens beyond what
    was waited for (an engine running ahead). ``streams`` keeps every stream opened."""

    def __init__(self, inner: Prior, lag: int = 0):
        super().__init__(inner)
        self.lag = lag
        self.streams = []

    @property
    def capabilities(self):
        return super().capabilities | {STREAM}

    def open_stream(self):
        from posterior.priors.stream import DrawAhead

        self.streams.append(DrawAhead(self, lag=self.lag))
        return self.streams[-1]


# --------------------------------------------------------------------------------------------------
# Conformance: what every prior and every twist must satisfy
# --------------------------------------------------------------------------------------------------
def _close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str) -> None:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    same_inf = torch.isinf(a) & (a == b)
    gap = torch.where(same_inf, 0.0, (a - b).abs())
    if not bool((gap <= atol).all()):
        raise AssertionError(f"{what}: differ by up to {float(gap.nan_to_num(math.inf).max()):.3g} > atol={atol:g}\n{a}\n{b}")


def check_prior_conformance(prior: Prior, *, prompts=None, max_new_tokens: int = 3, n: int = 6, seed: int = 0,
                            atol: float = 1e-4, enumeration_limit: int = 20_000) -> None:  # fmt: skip
    """Assert the contract of :class:`~posterior.priors.base.Prior` on ``prior``.

    Every prior: ``sample`` gives EOS-padded (P, n, T) tokens whose rows end at their first EOS or
    at ``max_new_tokens`` (the EOS counted in ``lengths``), texts are the decoded non-EOS tokens,
    and the sampled ``log_prob`` equals sequence scoring (``token_log_probs``, 0 after lengths).
    Step-wise priors (``NEXT_TOKEN``) also: every next-token distribution is normalised, walking
    ``start``/``extend`` scores a sequence as ``token_log_probs`` does, ``select`` and ``reorder``
    give the chosen rows (and the states they return continue as those rows), ``select`` leaves
    its input intact; where the support is enumerable (:func:`posterior.exact.enumerable`), pi0
    sums to 1 over it. ``atol`` is the float32 tolerance on log-probabilities.
    """
    from posterior.exact import enumerable, enumerate_continuations

    prompt_ids = prior.encode_prompts(prompts)
    P, T, eos = len(prompt_ids), max_new_tokens, set(prior.eos_token_ids)
    g = torch.Generator(device=prior.device).manual_seed(seed)
    c = prior.sample(prompt_ids, n, T, generator=g)
    if tuple(c.lengths.shape) != (P, n) or c.tokens.dim() != 3 or c.tokens.shape[:2] != (P, n):
        raise AssertionError(f"sample: tokens {tuple(c.tokens.shape)}, lengths {tuple(c.lengths.shape)}; want (P, n, T), (P, n)")
    for p in range(P):
        for i in range(n):
            row, L = c.tokens[p, i].tolist(), int(c.lengths[p, i])
            if not 1 <= L <= T:
                raise AssertionError(f"sample: length {L} outside [1, max_new_tokens={T}]")
            if any(v in eos for v in row[: L - 1]):
                raise AssertionError(f"sample: EOS before the end of {row[:L]} (length {L})")
            if row[L - 1] not in eos and L != T:
                raise AssertionError(f"sample: {row[:L]} neither ends with EOS nor has max_new_tokens={T} tokens")
            if any(v != prior.eos_token_ids[0] for v in row[L:]):
                raise AssertionError(f"sample: {row} is not padded with eos_token_ids[0] after length {L}")
            text = prior.decode([v for v in row[:L] if v not in eos])
            if c.texts[p][i] != text:
                raise AssertionError(f"sample: text {c.texts[p][i]!r} is not the decoded tokens {text!r}")
    tlp = prior.token_log_probs(prompt_ids, c.tokens, c.lengths)  # (P, n, T')
    after = torch.arange(tlp.shape[-1]) >= c.lengths[..., None]
    if bool((tlp.cpu()[after] != 0).any()):
        raise AssertionError("token_log_probs: not 0 after each sequence's length")
    _close(tlp.double().sum(-1), c.log_prob, atol, "sampled log_prob vs token_log_probs (sequence scoring)")
    _close(prior.log_prob(prompt_ids, c.tokens, c.lengths), c.log_prob, atol, "log_prob vs sampled log_prob")
    if not prior.has(NEXT_TOKEN):
        return

    # step-wise: normalisation, step-wise scoring == sequence scoring
    state = prior.start(prompt_ids, copies=n)
    walked = torch.zeros(P * n, dtype=torch.float64)
    flat_tok, flat_len = c.tokens.reshape(P * n, -1), c.lengths.reshape(-1)
    for t in range(int(flat_len.max())):
        lse = torch.logsumexp(state.logprobs.double().cpu(), -1)
        _close(lse, torch.zeros_like(lse), atol, f"next-token distributions after {t} tokens: logsumexp")
        tok = flat_tok[:, t]
        lp = state.logprobs.double().cpu().gather(1, tok[:, None]).squeeze(1)
        walked += torch.where(t < flat_len, lp, 0.0)
        state = prior.extend(state, tok.to(prior.device))
    _close(walked.view(P, n), tlp.double().sum(-1), atol, "start/extend (step-wise) vs token_log_probs (sequence scoring)")

    # select / reorder: the chosen rows, continuing as those rows; select keeps its input
    def two_steps():
        s = prior.start(prompt_ids, copies=2)
        return prior.extend(s, flat_tok[: 2 * P, 0].to(prior.device))

    idx = torch.tensor([2 * P - 1, 0, 2 * P - 1])
    word = next(v for v in range(prior.vocab_size) if v not in eos)  # a token that does not end the row
    base = two_steps()
    before = base.logprobs.detach().clone()
    chosen = prior.select(base, idx.to(prior.device))
    _close(chosen.logprobs, before[idx.to(before.device)], 0.0, "select: rows of the input")
    _close(base.logprobs, before, 0.0, "select changed its input state")
    want = prior.select(prior.extend(two_steps(), torch.full((2 * P,), word, device=prior.device)), idx.to(prior.device))
    got = prior.extend(chosen, torch.full((3,), word, device=prior.device))
    _close(got.logprobs, want.logprobs, atol, "select then extend vs extend then select")
    moved = prior.reorder(two_steps(), idx.to(prior.device))
    _close(moved.logprobs, before[idx.to(before.device)], 0.0, "reorder: rows of the input")
    got = prior.extend(moved, torch.full((3,), word, device=prior.device))
    _close(got.logprobs, want.logprobs, atol, "reorder then extend vs extend then select")

    # enumerable: pi0 sums to one over the support (EOS-ended and max_new_tokens-long sequences)
    if enumerable(prior, T, limit=enumeration_limit):
        for prompt in prompts or [None]:
            seqs, lp = enumerate_continuations(prior, T, prompt, max_sequences=enumeration_limit)
            total = torch.logsumexp(lp, 0)
            _close(total, torch.zeros_like(total), atol, f"log sum of pi0 over the {len(seqs)} enumerated continuations")


def check_twist_conformance(twist, prior: Prior, *, prompts=None, max_new_tokens: int = 3, n: int = 6, seed: int = 0,
                            atol: float = 1e-5) -> None:  # fmt: skip
    """Assert the contract of :class:`~posterior.twists.base.Twist` on prefixes of ``prior``'s samples.

    ``values`` (where implemented) is (B,) float64, never NaN or +inf, and the same on a second
    call; a dense twist's ``next_values`` at x_1:t-1, read at x_t, is ``values`` at x_1:t; a
    trainable twist's ``prefix_values`` is ``values`` at every prefix (0 after each length; the
    last position of an ended sequence is unused and not compared). Neither call changes its input.
    """
    from posterior.twists.base import Prefixes, TrainableTwist

    if twist.needs_hidden and not prior.has(HIDDEN_STATES):
        raise AssertionError(f"twist {twist.name!r} reads hidden states; {type(prior).__name__} has no {HIDDEN_STATES!r}")
    prompt_ids = prior.encode_prompts(prompts)
    g = torch.Generator(device=prior.device).manual_seed(seed)
    c = prior.sample(prompt_ids, n, max_new_tokens, generator=g)
    P, eos = len(prompt_ids), set(prior.eos_token_ids)

    def prefixes(rows: list[tuple[int, list[int]]]) -> Prefixes:  # (prompt index, prefix tokens) per row
        t = max(len(x) for _, x in rows)
        tokens = torch.full((len(rows), t), prior.eos_token_ids[0], dtype=torch.long)
        for b, (_, x) in enumerate(rows):
            tokens[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        hidden = None
        if twist.needs_hidden:
            hidden = torch.cat([prior.start([list(prompt_ids[p]) + x], hidden=True).hidden for p, x in rows])
        return Prefixes([prompt_ids[p] for p, _ in rows], tokens, torch.tensor([len(x) for _, x in rows]),
                        torch.tensor([p for p, _ in rows]), prior.decode, tuple(prior.eos_token_ids), hidden)  # fmt: skip

    rows = [(p, c.tokens[p, i, :t].tolist()) for p in range(P) for i in range(n) for t in range(1, int(c.lengths[p, i]) + 1)]
    x = prefixes(rows)
    kept = (x.tokens.clone(), x.lengths.clone())
    try:
        v = twist.values(x)
    except NotImplementedError:
        v = None
    if v is not None:
        if v.dtype != torch.float64 or tuple(v.shape) != (len(rows),):
            raise AssertionError(f"values: want ({len(rows)},) float64, got {tuple(v.shape)} {v.dtype}")
        if bool(torch.isnan(v).any() | torch.isposinf(v).any()):
            raise AssertionError(f"values: NaN or +inf in {v}")
        _close(twist.values(x), v, 0.0, "values: a second call differs")
    if twist.dense:
        parents = prefixes([(p, pre[:-1]) for p, pre in rows]) if all(len(pre) > 1 for _, pre in rows) else None
        if parents is None:  # prefixes of length 0 are allowed in next_values: build them one length at a time
            nv = torch.stack([twist.next_values(prefixes([(p, pre[:-1])]))[0] for p, pre in rows])
        else:
            nv = twist.next_values(parents)
        if nv.dtype != torch.float64 or tuple(nv.shape) != (len(rows), prior.vocab_size):
            raise AssertionError(f"next_values: want ({len(rows)}, V={prior.vocab_size}) float64, got {tuple(nv.shape)} {nv.dtype}")
        if bool(torch.isnan(nv).any() | torch.isposinf(nv).any()):
            raise AssertionError("next_values: NaN or +inf")
        if v is not None:
            last = torch.tensor([pre[-1] for _, pre in rows])
            _close(nv.gather(1, last[:, None]).squeeze(1), v, atol, "next_values at x_1:t-1 read at x_t vs values at x_1:t")
    if isinstance(twist, TrainableTwist) and v is not None:
        pv = twist.prefix_values(prompt_ids, c.tokens, c.lengths)  # (P, n, T)
        after = torch.arange(pv.shape[-1]) >= c.lengths[..., None]
        if bool((pv.detach().cpu()[after] != 0).any()):
            raise AssertionError("prefix_values: not 0 after each sequence's length")
        want, got = [], []
        k = 0
        for p in range(P):
            for i in range(n):
                L = int(c.lengths[p, i])
                ended = int(c.tokens[p, i, L - 1]) in eos
                for t in range(1, L + 1):
                    if not (ended and t == L):
                        want.append(v[k])
                        got.append(pv[p, i, t - 1])
                    k += 1
        if want:
            _close(torch.stack(got), torch.stack(want), atol, "prefix_values vs values at each prefix")
    if not (torch.equal(x.tokens, kept[0]) and torch.equal(x.lengths, kept[1])):
        raise AssertionError("the twist changed the prefixes it was given")
