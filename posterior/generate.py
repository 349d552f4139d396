"""``pst.generate``: posterior sampling as a drop-in for ``model.generate``.

    out = pst.generate(model, tokenizer, input_ids, reward=r, beta=0.1, n=4, max_new_tokens=32)
    out.sequences   # (P·n, L + T), like model.generate(input_ids, num_return_sequences=4, do_sample=True)

draws from pi*(x) ∝ pi0(x) exp(r(x)/beta), pi0 being the model's own sampling distribution
(``temperature`` / ``top_k`` / ``top_p`` modify it, and the result says so). It is
``Posterior(HFPrior(model, tokenizer, ...), reward, beta).sample(...)`` with the same seed, plus
the reshaping: weighted samples (importance sampling, SMC) are resampled by their weights so
that every returned row is a draw of the weighted empirical approximation of pi*.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

import torch

from posterior.posterior import Posterior
from posterior.priors.base import Prior
from posterior.results import SampleResult
from posterior.samplers.registry import sampler_options
from posterior.samplers.resampling import get_resampler
from posterior.validate import check_int, check_optional_int, check_seed

#: model.generate keywords pst.generate understands (everything else is a method option or an error).
GENERATION_KWARGS = (
    "max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "attention_mask",
    "do_sample", "num_return_sequences",
)  # fmt: skip
RESAMPLING = "multinomial"  # iid draws from the weighted samples: each row on its own is a draw


@dataclass(frozen=True)
class GenerateOutput:
    """What :func:`generate` returns.

    ``sequences`` row ``p·n + j`` is prompt p followed by sample ``indices[p, j]`` of
    ``result.texts[p]``; after a sequence's EOS the row is filled with the pad id, as
    ``model.generate`` does.
    """

    sequences: torch.Tensor  # (P·n, L + T) int64: prompt (as given, left-padded) + continuation
    result: SampleResult  # the sampler's full result (weights, rewards, log Z, diagnostics)
    indices: torch.Tensor  # (P, n) int64 sample of result behind each row
    resampled: bool  # True when rows were drawn by the weights (not the samples in order)
    texts: list[str]  # (P·n) continuation text of each row (prompt excluded)
    note: str  # how the rows relate to pi*, in words

    def __repr__(self):
        return f"GenerateOutput(sequences={tuple(self.sequences.shape)}, method={self.result.method!r}, resampled={self.resampled})"


def generate(
    model_or_llm,
    tokenizer,
    prompts_or_input_ids=None,
    *,
    reward,
    beta: float,
    method: str = "smc",
    n: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool | None = None,
    num_return_sequences: int | None = None,
    method_options: dict | None = None,
    progress: bool = False,
    **options,
) -> GenerateOutput:
    """Sample pi*(x) ∝ pi0(x) exp(r(x)/beta) with the calling convention of ``model.generate``.

    Parameters
    ----------
    model_or_llm : transformers causal LM, ``vllm.LLM`` or posterior ``Prior``
        The prior pi0. A ``vllm.LLM`` is served by ``VLLMPrior``; a ``Prior`` is used as it is
        (then temperature / top-k / top-p / eos must be left at their defaults).
    tokenizer : transformers tokenizer or None
        The model's tokenizer (None for a ``vllm.LLM`` or a ``Prior``: their own).
    prompts_or_input_ids : LongTensor (P, L) or (L,), tokenizer output, str, list of str, or None
        Token ids (left padding marked by ``attention_mask``, as for ``model.generate``), a
        ``BatchEncoding`` / dict with ``input_ids`` (and ``attention_mask``), or prompt texts
        (encoded as ``Posterior.sample`` does). None: one unconditional prompt.
    reward : Reward or callable
        r(x) on continuation texts, e.g. ``pst.rewards.from_trl(fn)``.
    beta : float > 0
    method : str
        A registered sampler ("smc", "is", "mh", "rejection", "qrs", "bon", "soft_bon").
    n : int
        Samples per prompt (default 4, or ``num_return_sequences``).
    seed : int
        Seeds the one generator used for sampling and then for resampling.
    max_new_tokens : int
        Tokens per continuation, EOS counted (default 32; the model's generation config is not read).
    temperature, top_k, top_p : optional
        Change the prior (``HFPrior(model, tokenizer, temperature=...)``; ``result.prior`` says
        so). Unlike ``model.generate``, nothing defaults to the generation config (no top_k=50):
        pi0 is the model's distribution unless you ask.
    eos_token_id : int or list of int, optional
        Tokens that end a sequence (default: the tokenizer's and generation config's).
    pad_token_id : int, optional
        Fills prompt padding (text prompts) and positions after EOS (default: the tokenizer's pad
        id, else the first EOS id).
    attention_mask : LongTensor (P, L), optional
        1 on prompt tokens, 0 on padding. Without it, as in ``model.generate``, positions equal to
        a pad id that is not an EOS id are padding.
    do_sample : bool, optional
        True or None; False (greedy decoding) is not a distribution and raises.
    num_return_sequences : int, optional
        Alias of ``n``.
    method_options : dict, optional
        Method options as a dict (merged with ``**options``; a name given both ways raises).
    progress : bool
        Progress bar.
    **options
        The method's options (``ess_threshold=0.5``, ``proposal="tilted"``, ``best_of=8``, ...);
        any other name raises ``TypeError`` naming it.

    Returns
    -------
    GenerateOutput
        ``sequences`` (P·n, L + T) prompt-major, ``result`` (the SampleResult), ``indices``,
        ``resampled``, ``texts`` and ``note``. When the method's weights are not uniform (or it
        returns more than n samples), the n rows of a prompt are drawn from its samples by
        multinomial resampling with the same generator (``resampled=True``); else they are the
        samples in order.
    """
    n = _check_n(n, num_return_sequences)
    if do_sample is False:
        raise ValueError("do_sample=False is greedy decoding, not a distribution; pst.generate samples pi*")
    seed = check_seed("seed", seed)
    method_opts = dict(method_options or {})
    clash = sorted(set(method_opts) & set(options))
    if clash:
        raise TypeError(f"method option(s) {clash} given both as keywords and in method_options")
    method_opts.update(options)
    known = sampler_options(method)  # raises for an unknown method
    unknown = sorted(set(method_opts) - set(known))
    if unknown:
        raise TypeError(
            f"pst.generate got unexpected keyword(s) {unknown}: not generation options it supports "
            f"{sorted(GENERATION_KWARGS)} nor options of method {method!r} {sorted(known)}"
        )

    prior, tokenizer = _make_prior(model_or_llm, tokenizer, temperature, top_k, top_p, eos_token_id)
    pad = _pad_id(pad_token_id, tokenizer, prior)
    prompts, prompt_block, prior = _prompts(prior, prompts_or_input_ids, attention_mask, pad)

    from posterior.rewards.base import as_reward
    from posterior.rewards.trl import with_tokenizer

    post = Posterior(prior, with_tokenizer(as_reward(reward), tokenizer), beta)
    generator = torch.Generator(device=prior.device)  # what Posterior.sample(seed=seed) makes
    generator.manual_seed(seed)
    res = post.sample(n=n, method=method, max_new_tokens=max_new_tokens, prompts=prompts, generator=generator,
                      progress=progress, **method_opts)
    return _to_output(res, prompt_block, n, pad, generator, seed)


# --------------------------------------------------------------------------------------------------
def _check_n(n, num_return_sequences) -> int:
    n = check_optional_int("n", n, 1)
    num_return_sequences = check_optional_int("num_return_sequences", num_return_sequences, 1)
    if n is not None and num_return_sequences is not None and n != num_return_sequences:
        raise ValueError(f"n={n} and num_return_sequences={num_return_sequences} disagree (one is an alias of the other)")
    return n if n is not None else num_return_sequences if num_return_sequences is not None else 4


def _is_vllm(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "vllm"  # never import vllm to check


def _make_prior(model, tokenizer, temperature, top_k, top_p, eos_token_id):
    """(prior, tokenizer): the model's sampling distribution as a posterior Prior."""
    from posterior.priors.base import validate_sampling

    validate_sampling(temperature, top_k, top_p)
    eos = None if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    modified = _modifications(temperature, top_k, top_p)
    if isinstance(model, Prior):
        if modified or eos is not None:
            raise ValueError(
                f"pst.generate got a posterior Prior and {sorted(modified) + (['eos_token_id'] if eos else [])}; "
                "build the prior with them (HFPrior(model, tokenizer, temperature=...)) or pass the model"
            )
        return model, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if _is_vllm(model):
        from posterior.priors.vllm import VLLMPrior

        kw = dict(modified, **({"eos_token_ids": eos} if eos is not None else {}))
        prior = VLLMPrior(model, **kw)
        return prior, tokenizer if tokenizer is not None else prior.tokenizer
    if tokenizer is None:
        raise ValueError(f"pst.generate needs the tokenizer of the {type(model).__name__} model")
    if not callable(model) or not hasattr(model, "config"):
        raise ValueError(f"model_or_llm must be a transformers causal LM, a vllm.LLM or a posterior Prior, got {type(model).__name__}")
    from posterior.priors.hf import HFPrior

    prior = HFPrior(model, tokenizer, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_ids=eos)
    return prior, tokenizer


def _modifications(temperature, top_k, top_p) -> dict:
    """The sampling modifications that differ from the model's own distribution."""
    out = {} if temperature == 1.0 else {"temperature": temperature}
    return {**out, **({} if top_k is None else {"top_k": top_k}), **({} if top_p is None else {"top_p": top_p})}


def _pad_id(pad_token_id, tokenizer, prior) -> int:
    if pad_token_id is not None:
        return check_int("pad_token_id", pad_token_id, 0)
    tok_pad = getattr(tokenizer, "pad_token_id", None)
    return int(tok_pad) if tok_pad is not None else int(prior.eos_token_ids[0])


def _prompts(prior: Prior, given, attention_mask, pad: int):
    """(prompt texts or None, (P, L) prompt block for the output, prior to sample with)."""
    if isinstance(given, Mapping):
        if "input_ids" not in given:
            raise ValueError(f"a dict of inputs needs 'input_ids', got keys {sorted(given)}")
        if attention_mask is not None and given.get("attention_mask") is not None:
            raise ValueError("attention_mask given twice (in the inputs and as a keyword)")
        attention_mask = given.get("attention_mask", attention_mask)
        given = given["input_ids"]
    if given is None or isinstance(given, str) or (isinstance(given, (list, tuple)) and given and all(isinstance(p, str) for p in given)):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with input_ids, not with prompt texts")
        prompts = None if given is None else [given] if isinstance(given, str) else list(given)
        rows = prior.encode_prompts(prompts)
        return prompts, _left_pad(rows, pad), prior
    if not isinstance(given, torch.Tensor):
        raise ValueError(
            f"prompts_or_input_ids must be a LongTensor of input ids, tokenizer output, a str or a list of str, got "
            f"{type(given).__name__}: {given!r:.80}"
        )
    return _id_prompts(prior, given, attention_mask, pad)


def _left_pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    L = max(len(r) for r in rows)
    block = torch.full((len(rows), L), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        block[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
    return block


def _id_prompts(prior: Prior, ids: torch.Tensor, mask, pad: int):
    """Prompts given as token ids: their texts (for rewards and results) and a prior that encodes
    those texts to exactly these ids."""
    if ids.dim() == 1:  # one prompt, as model.generate also accepts
        ids = ids[None]
        if mask is not None and torch.as_tensor(mask).dim() == 1:
            mask = torch.as_tensor(mask)[None]
    if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty LongTensor (P, L), got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.long().cpu()
    implied = mask is None
    if mask is None:  # model.generate's rule: pad tokens mark padding unless pad is also EOS
        mask = ids != pad if pad not in prior.eos_token_ids and bool((ids == pad).any()) else torch.ones_like(ids)
    mask = torch.as_tensor(mask).cpu()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids shape {tuple(ids.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"attention_mask must hold 0 and 1, got values {sorted(set(mask.unique().tolist()))}")
    on = mask.bool()
    ones_before = on.long().cumsum(-1) > 0  # (P, L) a prompt token at or before this position
    ones_after = on.flip(-1).long().cumsum(-1).flip(-1) > 0  # (P, L) ... at or after it
    inside = ~on & ones_before & ones_after  # (P, L) a 0 between prompt tokens: not padding
    if bool(inside.any()):
        i, j = inside.nonzero()[0].tolist()
        raise ValueError(
            f"input row #{i}: attention_mask has a 0 at position {j}, between prompt tokens; only padding (at the "
            "left, or the right) may be masked, since a masked prompt token would be dropped from the prompt"
            + (" (no attention_mask was given: positions equal to pad_token_id count as padding)" if implied else "")
        )
    rows = [ids[i][on[i]].tolist() for i in range(ids.shape[0])]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"input row #{i} has no tokens under its attention mask")
    if len(rows) == 1 and rows == prior.encode_prompts(None):  # just BOS: the unconditional prompt
        return None, ids, prior
    texts = [prior.decode(r) for r in rows]
    for i, t in enumerate(texts):
        if not t:
            raise ValueError(f"input row #{i} {rows[i]} decodes to an empty prompt text")
    if prior.encode_prompts(texts) == rows:  # the texts re-encode to exactly these ids
        return texts, ids, prior
    table: dict[str, list[int]] = {}
    for i, (t, r) in enumerate(zip(texts, rows)):
        if table.setdefault(t, r) != r:
            raise ValueError(f"input rows with different ids decode to the same text {t!r} (row #{i})")
    exact = copy.copy(prior)  # a shallow copy (same model): the caller's prior is left as it was
    exact.encode_prompts = _ExactIds(prior.encode_prompts, table)
    return texts, ids, exact


class _ExactIds:
    """``encode_prompts`` returning the caller's token ids for their decoded texts (so sampling
    conditions on exactly the given ids even where decode + encode does not round-trip, e.g.
    special tokens of a chat template); other texts are encoded as before."""

    def __init__(self, encode, table: dict[str, list[int]]):
        self.encode, self.table = encode, table

    def __call__(self, prompts):
        if prompts is None:
            return self.encode(None)
        return [list(self.table[p]) if p in self.table else self.encode([p])[0] for p in prompts]


def _to_output(res: SampleResult, prompt_block: torch.Tensor, n: int, pad: int, generator, seed: int) -> GenerateOutput:
    P, N = res.log_weights.shape
    lw = res.log_weights.double()
    uniform = bool(torch.isfinite(lw).all()) and bool((lw == lw[:, :1]).all())
    resampled = not uniform or N != n
    if resampled:
        idx = get_resampler(RESAMPLING)(lw.to(generator.device), n, generator=generator).cpu()  # (P, n)
    else:
        idx = torch.arange(n).expand(P, n).clone()
    T = res.tokens.shape[-1]
    tokens = res.tokens.gather(1, idx[..., None].expand(P, n, T))  # (P, n, T)
    lengths = res.lengths.gather(1, idx)  # (P, n)
    width = max(1, int(lengths.max()))
    cont = tokens[..., :width].clone()
    cont[torch.arange(width) >= lengths[..., None]] = pad  # after EOS (or the end): pad, as generate does
    sequences = torch.cat([prompt_block.repeat_interleave(n, 0), cont.reshape(P * n, width)], dim=1)
    texts = [res.texts[p][i] for p in range(P) for i in idx[p].tolist()]
    return GenerateOutput(sequences, res, idx, resampled, texts, _note(res, n, resampled, seed))


def _note(res: SampleResult, n: int, resampled: bool, seed: int) -> str:
    P, N = res.log_weights.shape
    if resampled:
        ess = ", ".join(f"{e:.1f}" for e in res.ess.tolist()[:4]) + (", ..." if P > 4 else "")
        parts = [
            f"sequences are {n} draws per prompt, by multinomial resampling (generator seeded with {seed}), from the "
            f"{N} weighted samples of .result (ESS {ess}; a row may repeat)"
        ]
    else:
        parts = [f"sequences are the {N} equally weighted samples per prompt of .result, in order"]
    if not res.targets_posterior:
        parts.append(f"method {res.method!r} does not target pi*: these are its outputs, not posterior draws")
    else:
        parts.append(f"method {res.method!r} targets pi*")
    if res.prior.get("modified"):
        mods = _modifications(res.prior.get("temperature", 1.0), res.prior.get("top_k"), res.prior.get("top_p"))
        parts.append(f"the prior pi0 is the model with {mods} (.result.prior)")
    return "; ".join(parts)


__all__ = ["GENERATION_KWARGS", "GenerateOutput", "generate"]
