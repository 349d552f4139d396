"""Small offline models for tests and examples: nothing here downloads anything.

``tiny_hf_prior`` builds a randomly initialised transformers causal LM (GPT-2 or Llama) from a
config with a character-level tokenizer made in memory. ``two_token_prior`` and ``markov_prior``
are exact ``CallablePrior``s whose posteriors can be enumerated with :mod:`posterior.exact`;
``SequencePrior`` hides a prior's step-wise capability (a stand-in for a serving engine).
"""

from __future__ import annotations

import string

import torch

from posterior.priors.base import STREAM, Prior
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
