"""Every example script runs to completion (those on the default model are slow)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    text = (ROOT / "README.md").read_text()
    return [b.split("\n```", 1)[0] for b in text.split("```python\n")[1:]]


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
