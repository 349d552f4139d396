"""The per-prompt driver: a method run once per prompt, for rewards that read prompts (TRL reward
functions).

Samplers call a reward on flat lists of continuation texts (SMC on the candidates of whichever
particles are running), so a text's prompt is not known at the call. A reward with
``needs_prompts = True`` is therefore bound to one prompt, ``reward.for_prompt(prompt, index)``,
and ``Posterior.sample`` runs the method once per prompt with the bound reward (prompts in order,
one shared generator; with per-prompt seeds, :mod:`posterior.streams`, each prompt's own), then stacks the per-prompt results as if they came from one run (a new
result: the per-prompt results are never changed). Rewards that do not read prompts keep the
single batched run over all prompts.

What differs from a batched run: the random stream (each prompt's draws follow the previous
prompt's), and per-step diagnostics of prompts that finished early, which are right-padded (see
:func:`stack_results`). Everything per sample (texts, tokens, weights, rewards, log_Z, ess) is
exactly each prompt's own run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch

from posterior.errors import DegenerateWeightsError
from posterior.results import Info, SampleResult
from posterior.streams import Streams

#: Padding of per-step info arrays after a prompt's last step, where NaN would be wrong:
#: log-evidence increments are 0 after the end, so each row still sums to that prompt's log_Z.
_PAD_BY_KEY = {"log_Z_increments": 0.0}


def per_prompt(method, why: str = "the reward reads prompts"):
    """``method`` run once per prompt with ``post.reward.for_prompt(prompt, index)``, the results
    stacked (see the module docstring). A :class:`~posterior.samplers.registry.Method` gives a
    Method (its ``run`` wrapped); a plain sampler ``fn(post, prompts, *args, **kw)`` a function."""
    from posterior.samplers.registry import Method

    if isinstance(method, Method):
        return dataclasses.replace(method, run=per_prompt(method.run, why))
    sampler = method

    @functools.wraps(sampler)
    def run(post, prompts, *args, **kw):
        names = [""] if prompts is None else list(prompts)
        streams = kw.get("generator") if isinstance(kw.get("generator"), Streams) else None
        results = []
        for i, prompt in enumerate(names):
            bound = copy.copy(post)  # a shallow copy: same prior and beta, the reward bound to one prompt
            bound.reward = post.reward.for_prompt(prompt, i)
            if streams is not None:  # per-prompt seeds: prompt i's run draws from its own generator
                kw["generator"] = streams.generators[i]
            try:
                results.append(sampler(bound, None if prompts is None else [prompt], *args, **kw))
            except DegenerateWeightsError as e:
                # the run saw one prompt, its row 0: report the row in the caller's prompt list
                raise DegenerateWeightsError(f"{e} (prompt index {i})", rows=[i] if e.rows else []) from e
        if len(results) == 1:
            return results[0]
        return stack_results(results, pad_token=post.prior.eos_token_ids[0], why=why)

    return run


def stack_results(results: list[SampleResult], *, pad_token: int, why: str = "the reward reads prompts") -> SampleResult:
    """One :class:`SampleResult` over the prompts of several single-prompt results, in order.

    Per-sample tensors are concatenated along the prompt axis (tokens EOS-padded to the longest).
    ``info``: a tensor with one row per prompt is concatenated, its trailing axes right-padded to
    the longest (per-step arrays of prompts that finished early): NaN for floats (0 for
    ``log_Z_increments``), False for bools, -1 for integers. Other values equal in every result
    are kept once; values that differ become a list with one entry per prompt. ``info["runs"]``
    records that each prompt was sampled in its own run.
    """
    first = results[0]
    T = max(r.tokens.shape[-1] for r in results)
    tokens = torch.cat([_pad_last(r.tokens, (T,), pad_token) for r in results])
    log_Z = None if any(r.log_Z is None for r in results) else torch.cat([r.log_Z for r in results])
    keys = list(dict.fromkeys(k for r in results for k in r.info))
    info = {k: _stack_info(k, [r.info.get(k) for r in results]) for k in keys}
    info["runs"] = f"one per prompt ({len(results)}): {why}"
    kinds = {type(r.info) for r in results}
    info = (kinds.pop() if len(kinds) == 1 else Info).of(info)  # the method's own info class
    return SampleResult(
        method=first.method,
        beta=first.beta,
        prompts=[p for r in results for p in r.prompts],
        texts=[row for r in results for row in r.texts],
        tokens=tokens,
        lengths=torch.cat([r.lengths for r in results]),
        log_weights=torch.cat([r.log_weights for r in results]),
        rewards=torch.cat([r.rewards for r in results]),
        log_prior=torch.cat([r.log_prior for r in results]),
        log_Z=log_Z,
        ess=torch.cat([r.ess for r in results]),
        targets_posterior=first.targets_posterior,
        info=info,
        prior=first.prior,
    )


def _pad_last(t: torch.Tensor, shape: tuple[int, ...], value) -> torch.Tensor:
    """Right-pad the trailing ``len(shape)`` axes of ``t`` to ``shape`` with ``value``."""
    pad = []
    for size, want in zip(reversed(t.shape[t.dim() - len(shape):]), reversed(shape)):
        pad += [0, want - size]
    return torch.nn.functional.pad(t, pad, value=value) if any(pad) else t


def _stack_info(key: str, values: list):
    if all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1 for v in values):
        dims = {v.dim() for v in values}
        if len(dims) == 1:
            trailing = tuple(max(v.shape[d] for v in values) for d in range(1, dims.pop()))
            dtype = values[0].dtype
            if dtype == torch.bool:
                fill = False
            elif dtype.is_floating_point:
                fill = _PAD_BY_KEY.get(key, float("nan"))
            else:
                fill = -1
            return torch.cat([_pad_last(v, trailing, fill) for v in values])
    if all(_same(v, values[0]) for v in values[1:]):
        return values[0]
    return list(values)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a bool (arrays, dataclasses of tensors)
        return a is b

