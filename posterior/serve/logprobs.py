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

Posterior token log-probs (``posterior.token_logprobs: "posterior"``, or the server's
``--token-logprobs posterior``). The target is the posterior over whole texts x (the echoed
prompt's tokens first, then the completion), at most M tokens long (``posterior.horizon``; a text
cut at M tokens is scored as it is), with the reward reading the whole text:
pi*(x) ∝ pi0(x)·exp(r(x)/beta). Token t gets

    v_t = log pi0(x_t | x_<t) + log Z(x_<=t) - log Z(x_<t),   Z(h) = E_pi0[exp(r(h Y)/beta) | h],

Y a continuation of h to EOS or to M tokens in all (Z(h) = exp(r(h)/beta) for h ending at EOS or
of M tokens). The sum over ANY span s <= t < e telescopes to log pi0(x_s..e | x_<s) + log Z(x_<e)
- log Z(x_<s) = log pi*(the text goes on with x_s..e | x_<s): the continuation's end is a prefix
(its value Z), not a complete text, as pi0's summed log-probs are. So lm-eval's loglikelihood, which
sums the continuation's entries out of an echoed context + continuation, reads log pi* of the
continuation given the context whatever the split. Z(h) is estimated by importance sampling from the
prior, Z^(h) = mean_k exp(r(h Y_k)/beta) over K prior rollouts (``posterior.particles``) from a
generator seeded by h itself, so equal prefixes get equal estimates in every request (an estimate:
unbiased for Z, log Z^ biased low by about se^2/2, se the delta-method standard error
sd(w)/(sqrt(K) mean(w)) reported per prompt). Only the span's two end values carry error. The
``k`` alternatives are pi0's k most likely tokens, each with its pi* value (not pi*'s top k).
"""

from __future__ import annotations

import collections
import math
import threading
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


class PrefixValues:
    """log Z^(h) and its standard error for document prefixes h (the module docstring), cached
    (a small LRU keyed by the prefix; one object per (prior, reward, beta, K, M))."""

    def __init__(self, prior, reward, beta: float, samples: int, horizon: int, size: int = 4096):
        self.prior, self.reward, self.beta, self.samples, self.horizon, self.size = prior, reward, beta, samples, horizon, size
        self.eos = set(prior.eos_token_ids)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def text(self, ids) -> str:
        return self.prior.decode([i for i in ids if i not in self.eos])

    def __call__(self, prefix) -> tuple[float, float]:
        """(log Z^(prefix), se of log Z^); se 0 where Z is exact (an ended or full-length prefix)."""
        from posterior.seeds import derive_seed

        h = tuple(prefix)
        with self._lock:
            if h in self._cache:
                self._cache.move_to_end(h)
                return self._cache[h]
        if len(h) > self.horizon:
            raise ValueError(f"a text of {len(h)} tokens is longer than the horizon of {self.horizon} tokens (posterior.horizon)")
        if (h and h[-1] in self.eos) or len(h) == self.horizon:
            out = (float(self.reward([self.text(h)])[0]) / self.beta, 0.0)
        else:
            K = self.samples
            g = torch.Generator(device="cpu").manual_seed(derive_seed(len(h), "serve-token-logprobs-" + ",".join(map(str, h))))
            ext = self.prior.continue_prefixes([list(h)] * K, [[]] * K, self.horizon - len(h), generator=g)
            texts = [self.text(list(h) + ext.tokens[k, : int(ext.lengths[k])].tolist()) for k in range(K)]
            logw = self.reward(texts).double() / self.beta  # (K,)
            m = float(logw.max())
            if m == -math.inf:
                out = (-math.inf, math.inf)
            else:
                w = (logw - m).exp()
                mean = float(w.mean())
                se = float(w.std(unbiased=True)) / (math.sqrt(K) * mean) if K > 1 else math.inf
                out = (m + math.log(mean), se)
        with self._lock:
            self._cache[h] = out
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return out


def tilted(scored: Scored, start: list[int], values: PrefixValues) -> tuple[Scored, float]:
    """``scored`` (tokens after the document prefix ``start``) with each log pi0 turned into v_t of
    the module docstring, its alternatives too; returns it and the largest se of the log Z^ used."""
    lps, tops, worst = [], [], 0.0
    for t, (i, lp, alt) in enumerate(zip(scored.ids, scored.logprobs, scored.top)):
        if lp is None:
            lps.append(None)
            tops.append(alt)
            continue
        h = list(start) + scored.ids[:t]
        log_z, se = values(h)

        def v(tok, lp0):
            z, e = values(h + [tok])
            return lp0 + z - log_z, e

        value, e = v(i, lp)
        worst = max(worst, se, e)
        lps.append(value)
        new_alt = []
        for j, lpj in alt or []:
            vj, ej = v(j, lpj)
            worst = max(worst, ej)
            new_alt.append((j, vj))
        tops.append(new_alt if alt is not None else None)
    return Scored(list(scored.ids), lps, tops), worst


def join(a: Scored, b: Scored) -> Scored:
    return Scored(a.ids + b.ids, a.logprobs + b.logprobs, a.top + b.top)


__all__ = ["Scored", "chat_logprobs", "completion_logprobs", "echo_scores", "forced", "join", "stream_pieces", "tilted", "visible", "PrefixValues"]
