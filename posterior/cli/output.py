"""What the subcommands print: progress lines on stderr, strict JSON lines, rounded numbers.

Progress: when stderr is not a terminal (a log file, CI), tqdm's carriage-return redraws would
pile up on one line; :func:`line_progress` swaps stderr for a stream that prints one line per 10%
of each bar. JSON keeps full precision (a non-finite number is null, its reason under
"nonfinite"); human output rounds to 4 significant digits (:func:`num`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import sys
import time

_BAR = re.compile(
    r"(?P<desc>[^:\r\n]*): *(?P<pct>\d+)%\|[^|]*\| *(?P<n>[\d.]+[kMG]?)/(?P<total>[\d.]+[kMG]?) "
    r"\[(?P<elapsed>[^<\],]*)(?:<(?P<left>[^,\]]*))?(?:, *(?P<rate>[^,\]]*))?(?:, *(?P<post>[^\]]*))?"
)


class LineProgress:
    """A stand-in for stderr that turns tqdm's carriage-return bars into one line per 10%.

    It passes other text through and prints "posterior: smc 40% (13/32, 00:05, ~00:07 left)" when
    a bar crosses a tenth, with the bar's postfix (e.g. rejection's draws and acceptance rate);
    a bar that stays within one tenth is shown again every ``every`` seconds while its text
    changes, so a long wait is never silent."""

    every = 10.0  # seconds between lines of a bar that does not move by a tenth

    def __init__(self, stream):
        self.stream, self.shown, self.last = stream, {}, {}

    def write(self, text: str) -> int:
        for part in re.split(r"(\r|\n)", text):
            if part in ("\r", "\n", ""):
                continue
            m = _BAR.search(part)
            if m is None:
                if part.strip() and not part.startswith("\x1b"):
                    self.stream.write(part.rstrip() + "\n")
                continue
            tenth = int(m["pct"]) // 10
            desc = m["desc"].strip() or "progress"
            now = time.monotonic()
            crossed = self.shown.get(desc, -1) < tenth and (tenth > 0 or desc not in self.shown)
            stale = desc in self.last and now - self.last[desc][0] >= self.every and m["post"] != self.last[desc][1]
            if crossed or stale:
                self.shown[desc] = max(tenth, self.shown.get(desc, -1))
                self.last[desc] = (now, m["post"])
                left = (m["left"] or "").strip()
                post = (m["post"] or "").strip(" ,")
                # the bar's own estimate, unless its postfix has a better one (rejection's, from draws)
                left = f", ~{left} left" if left and "?" not in left and tenth < 10 and " left" not in post else ""
                self.stream.write(f"posterior: {desc} {m['pct']}% ({m['n']}/{m['total']}, {m['elapsed'].strip()}{left})"
                                  + (f" {post}" if post else "") + "\n")  # fmt: skip
        self.stream.flush()
        return len(text)

    def flush(self):
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def line_progress(enabled: bool):
    """While inside, tqdm bars on a non-terminal stderr come out one line per 10% (``enabled``)
    or not at all (transformers' own bars are turned off either way: they are not tqdm lines
    that can be paced)."""
    if sys.stderr.isatty() or isinstance(sys.stderr, LineProgress):
        yield
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not enabled:
        yield
        return
    stream = sys.stderr
    sys.stderr = LineProgress(stream)
    try:
        yield
    finally:
        sys.stderr = stream


def num(x, digits: int = 4) -> str:
    """A float for people: 4 significant digits (0.15726249999999997 -> 0.1573); None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


_REASONS = {
    "reward": {-math.inf: "-inf: the reward rules this text out (posterior weight 0)"},
    "log_weight": {-math.inf: "-inf: weight 0"},
}


def strict(obj, path: str, reasons: dict, key: str = ""):
    """obj with every non-finite float replaced by None; reasons[path] says what it was."""
    import torch

    if isinstance(obj, float) and not math.isfinite(obj):
        what = "NaN" if math.isnan(obj) else ("+inf" if obj > 0 else "-inf")
        reasons[path] = _REASONS.get(key, {}).get(obj, f"{what}" + (": undefined for this run" if what == "NaN" else ""))
        return None
    if isinstance(obj, dict):
        return {k: strict(v, f"{path}.{k}" if path else str(k), reasons, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{path}[{i}]", reasons, key) for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return strict(obj.tolist(), path, reasons, key)
    return obj


def json_line(obj: dict) -> None:
    """One strict JSON object per line, written whole: SIGINT is held off while it is written."""
    reasons: dict[str, str] = {}
    clean = strict(obj, "", reasons)
    if reasons:
        clean["nonfinite"] = reasons
    line = json.dumps(clean, allow_nan=False, default=str) + "\n"
    blocked = hasattr(signal, "pthread_sigmask")
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        sys.stdout.write(line)
        sys.stdout.flush()
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


# A report row's KL fields, as a table heads them. Every KL is >= 0; an estimate may not be.
KL_FIELDS = {"kl_prior": "KL(.|pi0)", "kl_target_forward": "KL(pi*|q)", "kl_target_reverse": "KL(q|pi*)"}


def negative_kl_notes(rows) -> list[str]:
    """One note per KL estimate below 0 in a report's rows (``compare``, ``overopt``): a KL is never
    negative, so such a number is estimation noise around a small KL, not a finding."""
    notes = []
    for r in rows:
        for key, label in KL_FIELDS.items():
            v = r.get(key)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0):
                continue
            se = r.get(f"{key}_se")
            se_txt = f" ± {num(se)} (standard error)" if isinstance(se, (int, float)) and math.isfinite(se) else ""
            where = r.get("name") or r.get("method") or "a row"
            if r.get("beta") is not None and "beta" not in str(where):
                where = f"{where} at beta {num(r['beta'])}"
            notes.append(f"{where}: {label} = {num(v)}{se_txt} is a noisy estimate below 0: the true KL is >= 0 "
                         "(more samples narrow the estimate)")  # fmt: skip
    return notes


def print_report(rep, *, as_json: bool, plot_path: str | None) -> str | None:
    """Print a report that has ``rows`` (``compare``, ``overopt``): JSON lines (one per row, then a
    summary) or its text table; then draw its plot. The report is printed before the plot, which may
    still fail: returns that failure's text (None when the plot was drawn or not asked for). A KL
    estimate below 0 gets a note saying it is noise (:func:`negative_kl_notes`): in the summary's
    ``notes`` (JSON), after the table (text)."""
    plot = plot_error = None
    if plot_path:
        try:
            plot = rep.plot(plot_path)
        except (OSError, ValueError) as e:
            plot_error = f"{type(e).__name__}: {e}"
    kl_notes = negative_kl_notes(rep.rows)
    if as_json:
        js = rep.to_json()
        for row in js["rows"]:
            json_line(row)
        summary = {"summary": True, **{k: v for k, v in js.items() if k != "rows"}, "plot": None if plot is None else str(plot)}
        if kl_notes:
            summary["notes"] = list(summary.get("notes") or []) + kl_notes
        json_line(summary)
    else:
        print(rep.format_table())
        for note in kl_notes:
            print(f"note: {note}")
        if plot is not None:
            print(f"plot: {plot}")
    return plot_error
