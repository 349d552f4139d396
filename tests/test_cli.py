"""The command line on a tiny model saved to disk (``--model PATH``): JSON and text output, exit
codes, help, progress, and SIGINT in a subprocess."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from posterior.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_loads(line: str):
    """json.loads that refuses NaN / Infinity (which Python's json accepts by default)."""

    def bad(name):
        raise ValueError(f"non-standard JSON constant {name} in {line!r}")

    return json.loads(line, parse_constant=bad)


def _default_sigint():
    # A shell's background job starts with SIGINT ignored, and children inherit that; Python only
    # installs its KeyboardInterrupt handler when SIGINT is not ignored at start-up.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args):
    """The command as a subprocess (stdout and stderr pipes: not terminals)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "posterior.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, preexec_fn=_default_sigint)


@pytest.fixture
def reaped():
    """Processes started by a test, killed if the test leaves them running (no orphans)."""
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def wait_for(proc, text: str, timeout: float = 120.0) -> str:
    """Read the child's stderr until ``text`` appears; returns what was read."""
    seen, t0 = "", time.monotonic()
    while text not in seen:
        assert time.monotonic() - t0 < timeout, f"no {text!r} on stderr within {timeout} s: {seen[-2000:]}"
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536).decode()
            assert chunk or proc.poll() is None, f"child exited early: {seen[-2000:]}"
            seen += chunk
    return seen


def test_json_lines_then_summary(model_dir, capsys):
    code = main(["sample", "hello", "good day", "--model", model_dir, "--reward", "sentiment", "--beta", "0.1",
                 "--method", "bon", "-n", "3", "--max-new-tokens", "6", "--option", "best_of=2", "--json"])
    assert code == 0
    lines = [strict_loads(l) for l in capsys.readouterr().out.splitlines()]
    samples, summary = lines[:-1], lines[-1]
    assert len(samples) == 6 and {s["prompt"] for s in samples} == {"hello", "good day"}
    assert set(samples[0]) == {"prompt", "text", "reward", "log_weight"}
    assert summary["method"] == "bon" and summary["best_of"] == 2 and summary["seed"] == 0
    assert set(summary) >= {"log_Z", "ess", "reward_mean", "seconds", "prior_reward_mean"}


def test_json_is_strict_with_null_and_the_reason_for_infinite_values(model_dir, capsys):
    """Contains("e") is -inf on most texts: no bare -Infinity, a null and its reason instead."""
    assert main(["sample", "hello", "--model", model_dir, "--reward", "contains:e", "--method", "is", "-n", "24",
                 "--max-new-tokens", "6", "--json", "--quiet"]) == 0
    lines = [strict_loads(l) for l in capsys.readouterr().out.splitlines()]
    dead = [s for s in lines[:-1] if s["reward"] is None]
    assert dead, "the test needs samples without an 'e'"
    for s in dead:
        assert s["log_weight"] is None
        assert s["nonfinite"]["reward"].startswith("-inf") and s["nonfinite"]["log_weight"].startswith("-inf")
    assert all(s["reward"] == 0.0 for s in lines[:-1] if s["reward"] is not None)
    assert lines[-1]["prior_reward_neg_inf"][0] > 0


def test_text_output_shows_posterior_prior_and_explained_diagnostics(model_dir, capsys):
    assert main(["sample", "hello", "--model", model_dir, "-n", "4", "--max-new-tokens", "5", "--method", "is",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    for part in ("posterior samples (is", "prior samples", "reward mean: posterior", "effective samples out of 4",
                 "log Z ", "KL(pi*||pi0)", "distinct"):
        assert part in out, part


def test_highest_weight_first_only_where_weights_differ_and_bon_by_reward(model_dir, capsys):
    assert main(["sample", "hello", "--model", model_dir, "-n", "4", "--max-new-tokens", "5", "--method", "rejection",
                 "--reward", "sentiment", "--option", "reward_upper_bound=1", "--beta", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "highest weight first" not in out and "in the order drawn" in out
    assert main(["sample", "hello", "--model", model_dir, "-n", "4", "--max-new-tokens", "5", "--method", "bon",
                 "--quiet", "--no-prior"]) == 0
    out = capsys.readouterr().out
    assert "highest reward first" in out and "w=" not in out


def test_bad_input_exits_2_with_a_message(model_dir, capsys):
    assert main(["sample", "hello", "--model", model_dir, "--beta", "0", "--quiet"]) == 2
    assert "beta must be a finite number > 0, got 0.0" in capsys.readouterr().err
    assert main(["sample", "hi", "--model", model_dir, "--option", "bogus=1", "--quiet"]) == 2
    assert "no option(s) ['bogus']" in capsys.readouterr().err


def test_sampler_errors_name_the_method_the_user_asked_for(model_dir, capsys):
    # (rejection takes the reward's declared bound by default: give it one that a reward exceeds)
    assert main(["sample", "hi", "--model", model_dir, "--method", "rejection", "--option", "reward_upper_bound=-5",
                 "--quiet", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "method 'rejection'" in err and "reward_upper_bound" in err and "Traceback" not in err


def test_prior_comparison_failure_keeps_the_posterior_result(model_dir, capsys, monkeypatch):
    """The prior draw shown for comparison is best effort: when it fails, the posterior result is
    printed anyway and the comparison says why it is missing (text and JSON)."""
    from posterior.samplers import common

    def broken(*args, **kwargs):
        raise RuntimeError("prior draw exploded")

    monkeypatch.setattr(common, "draw", broken)
    assert main(["sample", "hello", "--model", model_dir, "-n", "3", "--max-new-tokens", "4", "--method", "smc",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "posterior samples (smc" in out and "--- diagnostics" in out
    assert "prior samples: unavailable (RuntimeError: prior draw exploded)" in out
    assert main(["sample", "hello", "--model", model_dir, "-n", "3", "--max-new-tokens", "4", "--method", "smc",
                 "--quiet", "--json"]) == 0
    summary = strict_loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["prior_reward_mean"] is None and "prior draw exploded" in summary["prior_error"]


def test_prior_comparison_with_a_hard_constraint_counts_violations(model_dir, capsys):
    """Prior draws that violate a hard constraint do not make the comparison fail."""
    assert main(["sample", "hello", "--model", model_dir, "-n", "16", "--max-new-tokens", "6", "--method", "is",
                 "--reward", "contains:e", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "prior draws have reward -inf)" in out


def test_help_shows_defaults_every_method_option_and_reward_names(capsys):
    from posterior.samplers import SAMPLERS, sampler_options

    with pytest.raises(SystemExit) as e:
        main(["sample", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "(default: 0.1)" in text and "(default: 16)" in text and "(default: sentiment)" in text
    for name in SAMPLERS:
        assert f"  {name}: " in text, name
        for opt in sampler_options(name):
            assert f"{opt}=" in text, (name, opt)
    for reward in ("sentiment", "negative-sentiment", "contains:WORD"):
        assert reward in text
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_progress_goes_to_stderr_line_by_line_when_it_is_not_a_terminal(model_dir, reaped):
    proc = cli("sample", "hello", "--model", model_dir, "-n", "2", "--max-new-tokens", "4", "--method", "mh",
               "--option", "steps=12", "--no-prior")
    reaped.append(proc)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = [l for l in err.splitlines() if l.startswith("posterior: ")]
    assert any(l.startswith("posterior: loading") for l in lines)
    assert any(l.startswith("posterior: sampled in") for l in lines)
    assert any(l.startswith("posterior: mh ") and "%" in l for l in lines)  # the bar, as lines
    assert "\r" not in err


def _sigint_after(proc, marker: str, delay: float) -> tuple[str, str, float]:
    seen = wait_for(proc, marker)
    time.sleep(delay)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return out, seen + err, time.monotonic() - t0


def test_sigint_during_sampling_exits_130_at_once_with_one_line_and_no_traceback(model_dir, reaped):
    proc = cli("sample", "hello", "--model", model_dir, "-n", "2", "--max-new-tokens", "6", "--method", "mh",
               "--option", "steps=1000000", "--json")
    reaped.append(proc)
    out, err, waited = _sigint_after(proc, "sampling:", 1.0)
    assert proc.returncode == 130
    assert waited < 5.0  # well under a second here; slack for a loaded machine
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.count("posterior: interrupted") == 1
    assert out == ""


def test_sigint_while_json_is_printed_leaves_only_whole_lines(model_dir, reaped):
    """The child fills the stdout pipe (we do not read it) and blocks in a write; SIGINT then
    arrives mid-output. Every line that comes out must still be one whole JSON object."""
    proc = cli("sample", "hello", "--model", model_dir, "-n", "3000", "--max-new-tokens", "3", "--method", "is",
               "--json", "--no-prior", "--quiet")
    reaped.append(proc)
    ready, _, _ = select.select([proc.stdout], [], [], 120)  # output has begun
    assert ready and proc.poll() is None
    time.sleep(1.0)  # 3000 lines are ~5 pipe buffers: the child is now blocked in a write
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = out.splitlines()
    assert out.endswith("\n") and 0 < len(lines) < 3001
    for line in lines:
        strict_loads(line)
    assert "Traceback" not in err
