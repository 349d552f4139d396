"""Every example script runs to completion (those on the default model are slow)."""

import os
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
