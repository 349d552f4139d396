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

_BAR = re.compile(
    r"(?P<desc>[^:\r\n]*): *(?P<pct>\d+)%\|[^|]*\| *(?P<n>[\d.]+[kMG]?)/(?P<total>[\d.]+[kMG]?) "
    r"\[(?P<elapsed>[^<\],]*)(?:<(?P<left>[^,\]]*))?(?:, *(?P<rate>[^,\]]*))?(?:, *(?P<post>[^\]]*))?"
)


class LineProgress:
    """A stand-in for stderr that turns tqdm's carriage-return bars into one line per 10%.

    It passes other text through and prints "posterior: smc 40% (13/32, 00:05)" when a bar
    crosses a tenth (with the bar's postfix, e.g. the acceptance rate, when it has one)."""

    def __init__(self, stream):
        self.stream, self.shown = stream, {}

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
            if self.shown.get(desc, -1) < tenth and (tenth > 0 or desc not in self.shown):
                self.shown[desc] = tenth
                left = (m["left"] or "").strip()
                left = f", ~{left} left" if left and "?" not in left and tenth < 10 else ""
                post = (m["post"] or "").strip(" ,")
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
    """While inside, tqdm bars on a non-terminal stderr come out one line per 10%."""
    if not enabled or sys.stderr.isatty() or isinstance(sys.stderr, LineProgress):
        yield
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bars are not tqdm lines we can pace
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
