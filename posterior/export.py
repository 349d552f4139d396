"""Export a :class:`~posterior.results.SampleResult`: JSON lines and pandas DataFrames.

One record per sample (prompt-major): ``prompt_index``, ``sample``, ``prompt`` (None when
unconditional), ``text``, ``reward``, ``log_weight`` (normalised per prompt), ``log_prior`` and
``length`` (tokens, EOS counted). JSON lines are strict JSON: a non-finite number is written as
``null`` and its value named in ``"nonfinite"``, e.g. ``{"reward": null, ..., "nonfinite":
{"reward": "-inf"}}`` (reward -inf: the sample violates a hard constraint and has weight 0).
"""

from __future__ import annotations

import json
import math
import os
from typing import IO, Iterator

PANDAS_INSTALL = "pip install pandas"
_NUMERIC = ("reward", "log_weight", "log_prior")


def records(res) -> Iterator[dict]:
    """One dict per sample, prompt-major, with Python floats (non-finite values kept as floats)."""
    names = res.prompts if res.prompts is not None else [None]
    for p, prompt in enumerate(names):
        for i, text in enumerate(res.texts[p]):
            yield {
                "prompt_index": p,
                "sample": i,
                "prompt": prompt,
                "text": text,
                "reward": float(res.rewards[p, i]),
                "log_weight": float(res.log_weights[p, i]),
                "log_prior": float(res.log_prior[p, i]),
                "length": int(res.lengths[p, i]),
            }


def _strict(record: dict) -> dict:
    bad = {k: str(record[k]) for k in _NUMERIC if not math.isfinite(record[k])}
    if not bad:
        return record
    out = {k: (None if k in bad else v) for k, v in record.items()}
    out["nonfinite"] = bad
    return out


def to_jsonl(res, path: str | os.PathLike | IO[str]) -> int:
    """Write one strict JSON object per sample to ``path`` (a file path or an open text file);
    returns the number of lines written."""
    def write(f) -> int:
        n = 0
        for rec in records(res):
            f.write(json.dumps(_strict(rec), allow_nan=False, ensure_ascii=False) + "\n")
            n += 1
        return n

    if hasattr(path, "write"):
        return write(path)
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        return write(f)


def to_pandas(res):
    """A ``pandas.DataFrame`` with one row per sample (columns as in :func:`records`)."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(f"SampleResult.to_pandas needs pandas: run `{PANDAS_INSTALL}`") from e
    return pd.DataFrame.from_records(list(records(res)), columns=["prompt_index", "sample", "prompt", "text", *_NUMERIC, "length"])
