"""TRL reward functions as posterior rewards, used unchanged.

TRL's GRPO / RLOO trainers call a reward function as

    fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

with one entry per completion in every list, ``columns`` being the dataset's other columns
repeated per completion. :func:`from_trl` makes the same call on posterior's continuation texts
(standard text format: prompts and completions are strings). A coroutine function is run to
completion with asyncio. ``None`` means "this function does not apply to this sample" in TRL
(it sums functions with nansum); here a reward must be a number, so ``None`` raises unless
``skip_none=True``, which makes it -inf: the sample gets weight 0 under pi*.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import inspect
import math
from typing import Any, Callable, Sequence

from posterior.rewards.base import Reward, RewardError, WeightedSum


class TRLReward(Reward):
    """A TRL reward function as a :class:`Reward` that reads prompts (see :func:`from_trl`).

    Called directly on texts it has no prompts and raises; samplers score it through
    ``for_prompt(prompt, index)``, which ``Posterior.sample`` does one prompt at a time.
    """

    needs_prompts = True

    def __init__(self, fn: Callable, *, skip_none: bool = False, tokenizer=None, accepts_prefixes: bool = False,
                 columns: dict[str, Sequence[Any]] | None = None):
        if not callable(fn):
            raise ValueError(f"from_trl needs a callable reward function, got {fn!r}")
        self.fn, self.skip_none, self.tokenizer = fn, bool(skip_none), tokenizer
        self.accepts_prefixes = bool(accepts_prefixes)
        self.can_be_neg_inf = self.skip_none
        self.columns = {}
        for key, values in (columns or {}).items():
            if key in ("prompts", "completions", "completion_ids"):
                raise ValueError(f"column {key!r} is passed by posterior itself; rename the dataset column")
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(
                    f"column {key!r} must be a sequence with one value per prompt (in the order of the sampled "
                    f"prompts), got {type(values).__name__}: {values!r}"
                )
            self.columns[key] = list(values)

    def __repr__(self):
        return f"from_trl({getattr(self.fn, '__name__', type(self.fn).__name__)})"

    def score(self, texts):
        raise RewardError(
            f"{self.name} reads prompts: score it with reward.for_prompt(prompt, index)(texts), or sample it "
            "through Posterior.sample / pst.generate, which pass each text's prompt"
        )

    def for_prompt(self, prompt, index):
        values = {}
        for key, col in self.columns.items():
            if index is None:
                if len(col) != 1:
                    raise RewardError(
                        f"{self.name}: column {key!r} has {len(col)} values, one per sampled prompt, but this call "
                        f"scores prompt {prompt[:60]!r} outside a sampling run; pass a one-value column"
                    )
                values[key] = col[0]
            elif index >= len(col):
                raise RewardError(
                    f"{self.name}: column {key!r} has {len(col)} values but prompt #{index} ({prompt[:60]!r}) was "
                    "sampled; give one value per prompt, in the order of the prompts"
                )
            else:
                values[key] = col[index]
        return _BoundTRL(self, prompt, values)

    def call(self, prompts: list[str], texts: list[str], columns: dict[str, list]) -> list:
        """The TRL call itself: one value per text (async functions run to completion)."""
        ids = None if self.tokenizer is None else [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        out = self.fn(prompts=prompts, completions=texts, completion_ids=ids, **columns)
        if inspect.isawaitable(out):
            out = _run_coroutine(out)
        return out


class _BoundTRL(Reward):
    """A :class:`TRLReward` on the continuations of one prompt."""

    def __init__(self, parent: TRLReward, prompt: str, values: dict[str, Any]):
        self.parent, self.prompt, self.values = parent, prompt, values
        self.accepts_prefixes, self.can_be_neg_inf = parent.accepts_prefixes, parent.can_be_neg_inf

    def __repr__(self):
        return self.parent.name

    def score(self, texts):
        m = len(texts)
        out = self.parent.call([self.prompt] * m, texts, {k: [v] * m for k, v in self.values.items()})
        try:
            out = list(out)
        except TypeError:
            raise RewardError(f"{self.name} returned {type(out).__name__}, not a list of floats") from None
        if len(out) != m:
            raise RewardError(f"{self.name} returned {len(out)} values for {m} completions")
        values = []
        for text, v in zip(texts, out):
            if v is None:
                if not self.parent.skip_none:
                    raise RewardError(
                        f"{self.name} returned None for completion {text!r} of prompt {self.prompt[:60]!r}; "
                        "use from_trl(fn, skip_none=True) to give such samples reward -inf (weight 0)"
                    )
                v = -math.inf
            values.append(v)
        return values


def _run_coroutine(coro):
    """Run an awaitable to completion; inside a running event loop (Jupyter) on a fresh thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(coro))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _await(coro)).result()


async def _await(x):
    return await x


def from_trl(fn: Callable, *, skip_none: bool = False, tokenizer=None, accepts_prefixes: bool = False, **columns) -> TRLReward:
    """A TRL reward function ``fn(prompts=, completions=, completion_ids=, **kwargs)`` as a reward.

    Parameters
    ----------
    fn : callable or coroutine function
        Called unchanged, on batches of continuations of one prompt at a time:
        ``prompts`` (that prompt, repeated; "" when unconditional), ``completions`` (the
        continuation texts, prompt excluded), ``completion_ids`` (see ``tokenizer``) and the
        ``columns``. Returns one float (or None) per completion.
    skip_none : bool
        False (default): a ``None`` reward raises ``RewardError``. True: ``None`` is reward -inf,
        i.e. the sample has weight 0 under pi* (TRL itself skips it in a nansum).
    tokenizer : optional
        Makes ``completion_ids`` the tokenizer's ids of each completion text (re-encoded, which may
        differ from the sampled ids where a text has several tokenisations); without it
        ``completion_ids`` is None. ``pst.generate`` passes the model's tokenizer.
    accepts_prefixes : bool
        Declare that ``fn`` is meaningful on partial completions, so SMC uses it as a twist.
    **columns : sequences
        Extra dataset columns, one value per prompt in the order of the sampled prompts; each
        completion receives its prompt's value (as TRL repeats columns per generation).

    Returns
    -------
    TRLReward
        A reward that reads prompts: ``Posterior.sample`` runs the sampler once per prompt.
    """
    return TRLReward(fn, skip_none=skip_none, tokenizer=tokenizer, accepts_prefixes=accepts_prefixes, columns=columns)


def with_tokenizer(reward: Reward, tokenizer) -> Reward:
    """``reward`` with every TRL term that has no tokenizer given ``tokenizer`` (copies; the
    input is unchanged), so its ``completion_ids`` are filled in."""

    if isinstance(reward, TRLReward) and reward.tokenizer is None:
        out = copy.copy(reward)
        out.tokenizer = tokenizer
        return out
    if isinstance(reward, WeightedSum) and reward.needs_prompts:
        return WeightedSum([(w, with_tokenizer(r, tokenizer)) for w, r in reward.terms])
    return reward
