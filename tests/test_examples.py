"""Every example script runs to completion (those on the default model are slow)."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, timeout: float = 600) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_exact_toy():
    assert run_example("exact_toy.py")


@pytest.mark.slow
def test_generate_hf():
    out = run_example("generate_hf.py")
    assert "torch.Size([8," in out and "method 'smc' targets pi*" in out


@pytest.mark.slow
def test_trl_reward():
    out = run_example("trl_reward.py")
    assert "one per prompt (2)" in out and out.count("chars)") == 8


@pytest.mark.slow
def test_rewards_zoo():
    out = run_example("rewards_zoo.py")
    assert "judge (the prior answers Yes)" in out and "JSON lines" in out


def _readme_python_blocks() -> list[str]:
    """The python blocks of the README and the docs pages (the README's snippets moved there)."""
    pages = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "API.md")  # API.md: listings
    return [b.split("\n```", 1)[0] for page in pages for b in page.read_text().split("```python\n")[1:]]


def test_every_example_and_readme_program_sets_the_fast_thread_count():
    """torch's default (one thread per core) is the slow case on a shared machine: the README's
    overoptimisation sweep took 2563 s under it (examples/overoptimization.py defaulted to 2
    threads) where the command line, which picks the count itself, took 50 s. Every example, and
    every README snippet that loads the default model in process, sets the count as the Library
    snippet does, before the model loads."""
    call = re.compile(r"torch\.set_num_threads\((?:args\.threads or )?default_threads\(\)\)")
    for path in sorted((ROOT / "examples").glob("*.py")):
        text = path.read_text()
        m = call.search(text)
        assert m, f"examples/{path.name} does not call torch.set_num_threads(default_threads())"
        for load in ("load_default_prior(", "tiny_hf_prior(", "CallablePrior("):
            at = text.find(load)
            assert at < 0 or m.start() < at, f"examples/{path.name} sets the thread count after {load}...)"
    blocks = [b for b in _readme_python_blocks() if "load_default_prior()" in b]
    assert len(blocks) >= 3, "the README's Library, hard-constraint and overoptimisation snippets"
    for b in blocks:
        m = call.search(b)
        assert m and m.start() < b.index("load_default_prior()"), f"README snippet without the thread count:\n{b[:300]}"


# --- every example at toy size (issue 29.4): in process, so the imports are paid once ------------

def run_toy(monkeypatch, capsys, name: str, *args: str) -> str:
    """Run examples/NAME with ``--toy`` (a tiny random model at small sizes) in this process."""
    monkeypatch.setattr(sys, "argv", [name, "--toy", *args])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the examples set the thread count for their process
    return capsys.readouterr().out


def test_every_example_says_what_it_shows_how_long_it_takes_and_has_a_toy_size():
    for path in sorted((ROOT / "examples").glob("*.py")):
        doc = path.read_text().split('"""')[1]
        assert re.search(r"about \d+ (s|min)\b", doc), f"examples/{path.name}: no time in its docstring"
        assert path.name == "exact_toy.py" or "--toy" in path.read_text(), f"examples/{path.name}: no --toy switch"


@pytest.mark.parametrize("name", ["quickstart.py", "generate_hf.py", "rewards_zoo.py", "trl_reward.py"])
def test_example_runs_at_toy_size(name, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = run_toy(monkeypatch, capsys, name)
    expect = {"quickstart.py": "best sample (highest reward)", "generate_hf.py": "(P·n, prompt + new tokens)",
              "rewards_zoo.py": "JSON lines", "trl_reward.py": "=== "}[name]
    assert expect in out, out[-2000:]


def test_overoptimization_example_runs_at_toy_size(monkeypatch, capsys, tmp_path):
    out = run_toy(monkeypatch, capsys, "overoptimization.py", "--plot", str(tmp_path / "a.png"),
                  "--plot-ensemble", str(tmp_path / "b.png"))
    assert "gold peak, single proxy vs ensemble" in out and (tmp_path / "a.png").exists()


def test_train_then_compare_examples_run_at_toy_size(monkeypatch, capsys, tmp_path):
    """The README's two-step recipe: train_sentiment.py saves adapters that compare_report.py loads."""
    out = run_toy(monkeypatch, capsys, "train_sentiment.py", "--out", str(tmp_path / "runs"), "--objectives", "dpg")
    assert "dpg: 2 steps" in out and (tmp_path / "runs" / "dpg" / "policy").exists()
    out = run_toy(monkeypatch, capsys, "compare_report.py", "--policy", f"dpg={tmp_path / 'runs' / 'dpg' / 'policy'}",
                  "--plot", str(tmp_path / "frontier.png"), "--json", str(tmp_path / "report.json"))
    assert "dpg" in out and (tmp_path / "frontier.png").exists() and (tmp_path / "report.json").exists()


def test_trl_rloo_example_runs_at_toy_size(monkeypatch, capsys):
    pytest.importorskip("trl")
    out = run_toy(monkeypatch, capsys, "trl_rloo.py", "--steps", "2", "--max-new-tokens", "4", "-n", "4")
    assert "IS with the RLOO-tuned as proposal" in out
