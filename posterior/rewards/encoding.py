"""Batches of texts through a transformers tokenizer, for rewards that run their own model."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def encoded_batches(tokenizer, texts: list[str], *, batch_size: int, max_length: int | None, device, what: str
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised, padded batches of ``texts`` on ``device``; a text that encodes to no tokens
    raises ``ValueError`` naming it and ``what`` (the model that cannot score it)."""
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[s : s + batch_size], padding=True, truncation=max_length is not None, max_length=max_length,
            return_tensors="pt",
        )  # fmt: skip
        empty = (enc["attention_mask"].sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"text {texts[s + empty[0]]!r} encodes to no tokens for the {what}")
        yield {k: v.to(device) for k, v in enc.items()}
