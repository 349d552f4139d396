"""What priors over a transformers tokenizer share (``HFPrior``, ``VLLMPrior``): prompts to token
ids (optionally as a chat turn), continuation texts, the EOS ids, and the vocabulary key that says
when two priors' token ids mean the same strings."""

from __future__ import annotations

import hashlib
from typing import Sequence


def eos_ids(tokenizer, generation_eos=None, given: Sequence[int] | None = None) -> tuple[int, ...]:
    """``given``, else the tokenizer's EOS id followed by the generation config's (deduplicated)."""
    eos = [int(i) for i in given] if given is not None else []
    for src in [] if given is not None else (tokenizer.eos_token_id, generation_eos):
        for i in [src] if isinstance(src, int) else (src or []):
            if int(i) not in eos:
                eos.append(int(i))
    if not eos:
        raise ValueError("the tokenizer and generation config define no EOS token id")
    return tuple(eos)


class TokenizerText:
    """Text handling over ``self.tokenizer``, ``self.chat`` and ``self.eos_token_ids``."""

    _vocab_key: str | None = None

    def vocabulary_key(self):
        if self._vocab_key is None:
            items = sorted(self.tokenizer.get_vocab().items())
            self._vocab_key = hashlib.sha256(repr(items).encode()).hexdigest()
        return self._vocab_key

    def encode_prompts(self, prompts: Sequence[str] | None) -> list[list[int]]:
        if prompts is None:  # unconditional: start from BOS (or EOS, as GPT-2 does)
            start = self.tokenizer.bos_token_id
            return [[start if start is not None else self.eos_token_ids[0]]]
        out = []
        for p in prompts:
            if self.chat:
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            else:
                ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            if len(ids) == 0:
                raise ValueError(f"prompt {p!r} encodes to no tokens")
            out.append(list(ids))
        return out

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
