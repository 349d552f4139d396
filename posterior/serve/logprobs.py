"""The prior's token log-probabilities of returned text (``logprobs``) and of the prompt (``echo``).

For each token x_t of a returned sequence, log pi0(x_t | prompt, x_<t) under the request's prior
(its temperature / top-p; the stop strings do not change any token before the stop), and with
``k`` alternatives the k most likely tokens there. ``echo`` scores the prompt itself: token t > 0
given tokens < t; the first has no context and gets null (as vLLM does), so a client can sum a
continuation's log-probs out of one prompt (lm-eval's loglikelihood requests: ``echo``,
``max_tokens: 0`` or 1, ``logprobs: 1``).

A sequence that ended at EOS has the EOS token last, with text "" (as vLLM; lm-eval's
loglikelihood drops the last entry, assuming one generated token). A sequence cut at a stop
string is scored up to the token before the one that completed the stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posterior.priors.base import NEXT_TOKEN


@dataclass(frozen=True)
class Scored:
    """One scored token sequence: ids, log-probs (None: no context) and alternatives."""

    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


def forced(prior, contexts: list[list[int]], seqs: list[list[int]], k: int) -> list[Scored]:
    """log pi0(seqs[b][t] | contexts[b] + seqs[b][:t]) for every b, t, with the top ``k`` tokens
    at each position (``k`` > 0 needs a prior with next-token distributions)."""
    B = len(seqs)
    if B == 0:
        return []
    if prior.has(NEXT_TOKEN):
        lps: list[list[float]] = [[] for _ in range(B)]
        tops: list[list] = [[] for _ in range(B)]
        width = max(len(s) for s in seqs)
        state = prior.start([list(c) for c in contexts], copies=1)
        pad = prior.eos_token_ids[0]
        for t in range(width):
            lp = state.logprobs.double().cpu()  # (B, V)
            best = torch.topk(lp, k, dim=-1) if k > 0 else None
            for b, s in enumerate(seqs):
                if t < len(s):
                    lps[b].append(float(lp[b, s[t]]))
                    tops[b].append(list(zip(best.indices[b].tolist(), best.values[b].tolist())) if best is not None else [])
            if t + 1 < width:
                step = torch.tensor([s[t] if t < len(s) else pad for s in seqs], device=prior.device)
                state = prior.extend(state, step)
        return [Scored(list(s), lps[b], tops[b]) for b, s in enumerate(seqs)]
    if k > 0:
        raise ValueError(f"{type(prior).__name__} gives no next-token distributions: top log-probs are not available")
    width = max(1, max(len(s) for s in seqs))
    tokens = torch.full((B, 1, width), prior.eos_token_ids[0], dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, 0, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([[len(s)] for s in seqs], dtype=torch.long)
    out = prior.token_log_probs([list(c) for c in contexts], tokens, lengths).double()  # (B, 1, T)
    return [Scored(list(s), out[b, 0, : len(s)].tolist(), [[] for _ in s]) for b, s in enumerate(seqs)]


def visible(prior, seq: list[int]) -> list[int]:
    """The tokens of a sequence that are scored: all of them, a final EOS included (as vLLM does:
    its text is ""), except for a sequence cut at a stop string, whose tokens from the one that
    completed the stop string on are left out (they hold no text the client receives)."""
    stops = getattr(prior, "stop_position", None)
    eos = set(prior.eos_token_ids)
    body = seq[:-1] if seq and seq[-1] in eos else seq
    at = stops(body) if stops is not None else None
    return seq if at is None else seq[: at - 1]


def echo_scores(prior, ids: list[int], k: int) -> Scored:
    """The prompt's own tokens scored left to right; the first gets None."""
    if len(ids) < 2:
        return Scored(list(ids), [None] * len(ids), [None] * len(ids))
    s = forced(prior, [ids[:1]], [ids[1:]], k)[0]
    return Scored(list(ids), [None, *s.logprobs], [None, *s.top])


def completion_logprobs(text_of, scored: Scored) -> dict:
    """OpenAI's completions ``logprobs`` object; ``text_of(id) -> str`` names a token."""
    tokens = [text_of(i) for i in scored.ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [None if alt is None else {text_of(i): lp for i, lp in alt} for alt in scored.top]
    return {"tokens": tokens, "token_logprobs": scored.logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(text_of, scored: Scored) -> dict:
    """OpenAI's chat ``logprobs`` object ({"content": [{token, logprob, bytes, top_logprobs}]})."""

    def entry(i, lp):
        t = text_of(i)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    content = []
    for i, lp, alt in zip(scored.ids, scored.logprobs, scored.top):
        content.append({**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in (alt or [])]})
    return {"content": content}


def stream_pieces(text: str, logprobs: dict, *, chat: bool) -> list[tuple[str, dict]]:
    """A choice's final text and logprobs object (:func:`completion_logprobs` or
    :func:`chat_logprobs`) cut into stream chunks: one per token while the tokens' texts spell the
    text, then one with the rest (the last token always, so the last chunk carries log-probs).
    Each piece's object is a slice of the whole one (``text_offset`` stays an offset into the
    choice's text, as vLLM streams it), so the pieces concatenate to exactly the non-streamed
    ``text`` and ``logprobs``. A token whose text is not the next part of the text (a byte of a
    multi-byte character, a space the tokenizer cleans up) and all after it go in the last piece."""
    tokens = [e["token"] for e in logprobs["content"]] if chat else logprobs["tokens"]

    def part(a: int, b: int | None) -> dict:
        if chat:
            return {"content": logprobs["content"][a:b]}
        return {k: logprobs[k][a:b] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}

    out, at, t = [], 0, 0
    while t < len(tokens) - 1 and text.startswith(tokens[t], at):
        out.append((tokens[t], part(t, t + 1)))
        at, t = at + len(tokens[t]), t + 1
    out.append((text[at:], part(t, None)))
    return out


def join(a: Scored, b: Scored) -> Scored:
    return Scored(a.ids + b.ids, a.logprobs + b.logprobs, a.top + b.top)


__all__ = ["Scored", "chat_logprobs", "completion_logprobs", "echo_scores", "forced", "join", "stream_pieces", "visible"]
