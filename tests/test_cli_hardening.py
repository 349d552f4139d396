"""Command-line hardening (issue 19): each test is named after what broke.

Seeds at the top of the accepted range, arguments checked before any model loads (asserted by
making every model loader raise), one-line errors, progress on stderr for train / compare /
rejection, the thread default, and output details. Tiny model on disk (``model_dir``)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import posterior as pst
from posterior.cli import main, output
from posterior.seeds import derive_seed
from posterior.threads import default_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_SEED = 2**64 - 1  # the largest seed Posterior.sample and torch.Generator.manual_seed accept


def run_cli(argv) -> int:
    """main(argv), with argparse's SystemExit turned into its exit code."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every way the command line loads a prior raises: a check that runs after loading fails."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pst, "load_default_prior", boom)
    monkeypatch.setattr(pst.HFPrior, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(pst.VLLMPrior, "from_pretrained", classmethod(boom))


@pytest.fixture
def torch_threads():
    """Restore torch's thread count after a test that lets the command line set it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# item 4: a seed the library accepts never crashes after sampling; nothing after the result loses it
# --------------------------------------------------------------------------------------------------
def test_derive_seed_never_overflows_and_separates_streams():
    seeds = [0, 1, 2**32, 2**63 - 1, 2**63, TOP_SEED]
    for s in seeds:
        for stream in ("prior comparison", "compare frontier", "rank 1"):
            d = derive_seed(s, stream)
            assert 0 <= d < 2**63
            torch.Generator().manual_seed(d)
    assert derive_seed(7, "a") == derive_seed(7, "a")
    assert derive_seed(7, "a") != derive_seed(7, "b") and derive_seed(7, "a") != derive_seed(8, "a")
    assert len({derive_seed(s, "prior comparison") for s in range(1000)}) == 1000


def test_sample_seed_2_64_minus_1_keeps_the_result_and_the_prior_comparison(model_dir, capsys):
    assert main(["sample", "hello", "--model", model_dir, "--seed", str(TOP_SEED), "-n", "2", "--max-new-tokens", "3",
                 "--method", "is", "--json", "--quiet"]) == 0  # fmt: skip
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and lines[-1]["seed"] == TOP_SEED
    assert lines[-1]["prior_reward_mean"] is not None and "prior_error" not in lines[-1]


def test_compare_seed_2_64_minus_1_estimated_frontier_does_not_overflow(model_dir, capsys):
    """The tiny model's support is too large to enumerate: the frontier is estimated from prior
    draws with a secondary seed (it was seed + 1, out of range at the top seed)."""
    assert main(["compare", "hello", "--model", model_dir, "--methods", "is", "-n", "2", "--max-new-tokens", "3",
                 "--seed", str(TOP_SEED), "--json", "--quiet"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["summary"] and summary["frontier_exact"] is False


def test_unexpected_error_after_sampling_keeps_the_result(model_dir, capsys, monkeypatch):
    """Any error in the best-effort prior comparison (here an OSError) leaves the result printed."""
    from posterior.samplers import common

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(common, "draw", broken)
    assert main(["sample", "hello", "--model", model_dir, "-n", "2", "--max-new-tokens", "3", "--method", "is",
                 "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "posterior samples (is" in out and "unavailable (OSError: disk on fire)" in out


def test_compare_plot_failure_after_the_comparison_keeps_the_table(model_dir, tmp_path, capsys, monkeypatch):
    from posterior.compare.report import ComparisonReport

    def broken(self, path, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(ComparisonReport, "plot", broken)
    code = main(["compare", "hello", "--model", model_dir, "--methods", "is", "-n", "2", "--max-new-tokens", "3",
                 "--plot", str(tmp_path / "f.png"), "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and "KL(.|pi0)" in captured.out
    assert "no space left on device" in captured.err


def test_train_save_failure_after_training_keeps_the_summary(model_dir, tmp_path, capsys, monkeypatch):
    from posterior.train.policy import HFPolicy

    def broken(self, path):
        raise OSError("read-only file system")

    monkeypatch.setattr(HFPolicy, "save", broken)
    code = main(["train", "hello", "--model", model_dir, "--reward", "sentiment", "--beta", "1", "--steps", "1",
                 "--batch-size", "2", "--max-new-tokens", "3", "--lora-rank", "2", "--out", str(tmp_path / "p"),
                 "--json", "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    summary = json.loads(captured.out.splitlines()[-1])
    assert summary["steps"] == 1 and summary["saved"] is None and "read-only" in summary["save_error"]
    assert "read-only file system" in captured.err


# --------------------------------------------------------------------------------------------------
# item 7 + item 8 (CLI): every argument is checked before the model loads; one line, exit 2
# --------------------------------------------------------------------------------------------------
BAD = [  # (command, extra argv, text the one error line must contain)
    ("sample", ["--beta", "-1"], "beta must be a finite number > 0, got -1.0"),
    ("sample", ["--method", "nope"], "'nope'"),
    ("sample", ["--option", "bogus=1"], "no option(s) ['bogus']"),
    ("sample", ["--method", "bon", "--option", "best_of=many"], 'best_of="many"'),
    ("sample", ["--method", "bon", "--option", "best_of=2", "--option", "best_of=3"], "--option best_of is given twice"),
    ("sample", ["--method", "is", "--option", "proposal=x"], "option proposal takes a Python object"),
    ("sample", ["--option", "noequals"], "'noequals'"),
    ("sample", ["-n", "0"], "n must be a positive int, got 0"),
    ("sample", ["--max-new-tokens", "0"], "max_new_tokens must be a positive int, got 0"),
    ("sample", ["--max-new-tokens", "x"], "'x'"),
    ("sample", ["--reward", "nosuch:thing"], "unknown reward 'nosuch'"),
    ("sample", ["--show", "-1"], "show must be a non-negative int, got -1"),
    ("sample", ["--seed", "-1"], "'-1'"),
    ("sample", ["--seed", str(2**64)], str(2**64)),
    ("sample", ["--temperature", "0"], "temperature must be a finite number > 0, got 0.0"),
    ("sample", ["--threads", "0"], "--threads must be an int >= 1, got 0"),
    ("sample", ["--engine-option", "max_model_len=64"], "needs --backend vllm"),
    ("sample", ["hello", ""], "prompt #1 is the empty string"),
    ("train", ["--beta", "-1"], "beta must be a finite number > 0, got -1.0"),
    ("train", ["--steps", "0"], "steps must be a positive int, got 0"),
    ("train", ["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    ("train", ["--objective", "dpg", "--batch-size", "1"], "batch_size must be an int >= 2, got 1"),
    ("train", ["--max-new-tokens", "0"], "max_new_tokens must be a positive int, got 0"),
    ("train", ["--reward", "nosuch"], "unknown reward 'nosuch'"),
    ("train", ["--seed", "-3"], "'-3'"),
    ("train", ["--backend", "vllm"], "posterior train runs on --backend hf"),
    ("compare", ["--beta", "-1"], "beta must be a finite number > 0, got -1.0"),
    ("compare", ["--methods", "is,nope"], "unknown method 'nope'"),
    ("compare", ["-n", "1"], "n must be an int >= 2, got 1"),
    ("compare", ["--option", "bon.best_of=0.5"], "--option bon.best_of=0.5"),
    ("compare", ["--option", "mh.steps=2"], "method 'mh' is not in --methods"),
    ("compare", ["--reward", "nosuch"], "unknown reward 'nosuch'"),
    ("compare", ["--max-new-tokens", "0"], "max_new_tokens must be a positive int, got 0"),
]


@pytest.mark.parametrize("command,extra,expected", BAD, ids=[f"{c}:{' '.join(e)}" for c, e, _ in BAD])
def test_bad_arguments_fail_before_the_model_loads_with_one_line(command, extra, expected, model_dir, tmp_path,
                                                                  no_model_loads, capsys):  # fmt: skip
    base = {"sample": ["sample", "hello"], "train": ["train", "hello", "--out", str(tmp_path / "p")],
            "compare": ["compare", "hello"]}[command]  # fmt: skip
    argv = [*base, "--model", model_dir, *extra] if extra[0].startswith("-") else [command, *extra, "--model", model_dir]
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err


def test_methods_empty_string_is_refused(model_dir, no_model_loads, capsys):
    assert run_cli(["compare", "hi", "--model", model_dir, "--methods", ""]) == 2
    assert "--methods '' names no method" in capsys.readouterr().err


def test_option_given_twice_is_refused_naming_the_key(model_dir, no_model_loads, capsys):
    assert run_cli(["compare", "hi", "--model", model_dir, "--methods", "bon", "--option", "bon.best_of=2",
                    "--option", "bon.best_of=3"]) == 2  # fmt: skip
    assert "--option bon.best_of is given twice" in capsys.readouterr().err
    assert run_cli(["sample", "hi", "--model", model_dir, "--engine-option", "a=1", "--engine-option", "a=2",
                    "--backend", "vllm"]) == 2  # fmt: skip
    assert "--engine-option a is given twice" in capsys.readouterr().err


def test_show_negative_is_refused(model_dir, no_model_loads, capsys):
    assert run_cli(["sample", "hi", "--model", model_dir, "--show", "-1"]) == 2
    assert "show must be a non-negative int, got -1" in capsys.readouterr().err


def test_gguf_file_without_model_is_refused(no_model_loads, capsys):
    for command in ("sample", "compare"):
        assert run_cli([command, "hi", "--gguf-file", "model.gguf"]) == 2
        assert "--gguf-file 'model.gguf' needs --model" in capsys.readouterr().err


def test_train_out_inside_a_file_is_refused_before_loading(model_dir, tmp_path, no_model_loads, capsys):
    (tmp_path / "file").write_text("x")
    assert run_cli(["train", "hi", "--model", model_dir, "--out", str(tmp_path / "file" / "policy")]) == 2
    assert "which is a file" in capsys.readouterr().err


def test_compare_plot_onto_a_folder_is_refused_before_loading(model_dir, tmp_path, no_model_loads, capsys):
    assert run_cli(["compare", "hi", "--model", model_dir, "--plot", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_judge_reward_gets_the_prior_in_train_and_compare(model_dir, tmp_path, capsys):
    judge = "judge:Is this text friendly?"
    assert main(["train", "hello", "--model", model_dir, "--reward", judge, "--beta", "1", "--steps", "1",
                 "--batch-size", "2", "--max-new-tokens", "3", "--lora-rank", "2", "--out", str(tmp_path / "p"),
                 "--json", "--quiet"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 1
    assert main(["compare", "hello", "--model", model_dir, "--reward", judge, "--methods", "is", "-n", "2",
                 "--max-new-tokens", "3", "--json", "--quiet"]) == 0  # fmt: skip
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert rows[0]["name"] == "is" and rows[0]["reward_mean"] is not None


def test_judge_inside_an_ensemble_gets_the_prior_in_sample(model_dir, capsys):
    """``ensemble:mean:sentiment,judge:...``: the judge member is built from the loaded prior (it
    used to be built without one and fail)."""
    spec = "ensemble:mean:sentiment,judge:Is this text friendly?"
    assert main(["sample", "hello", "--model", model_dir, "--reward", spec, "--method", "is", "-n", "2",
                 "--max-new-tokens", "3", "--json", "--quiet"]) == 0  # fmt: skip
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    samples = [l for l in lines if "text" in l]
    assert len(samples) == 2 and all(math.isfinite(s["reward"]) for s in samples)


# --------------------------------------------------------------------------------------------------
# item 10: threads
# --------------------------------------------------------------------------------------------------
def test_default_threads_is_one_per_free_core():
    assert default_threads(2, 0.1) == 2  # quiet 2-core machine: torch's default
    assert default_threads(2, 3.0) == 1  # loaded: never more threads than free cores
    assert default_threads(2, 0.9) == 1
    assert default_threads(8, 2.2) == 6
    assert default_threads(1, 0.0) == 1 and default_threads(4, 50.0) == 1
    assert 1 <= default_threads() <= len(os.sched_getaffinity(0))


def test_cli_threads_option_and_env_set_torch_threads(model_dir, torch_threads, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("POSTERIOR_THREADS", raising=False)
    argv = ["sample", "hi", "--model", model_dir, "-n", "2", "--max-new-tokens", "2", "--no-prior", "--quiet"]
    torch.set_num_threads(2)
    assert main([*argv, "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    monkeypatch.setenv("POSTERIOR_THREADS", "2")
    assert main(argv) == 0 and torch.get_num_threads() == 2
    monkeypatch.setenv("POSTERIOR_THREADS", "lots")
    assert run_cli(argv) == 2 and "POSTERIOR_THREADS must be an int >= 1, got 'lots'" in capsys.readouterr().err
    monkeypatch.delenv("POSTERIOR_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torch obeys it by itself: the CLI leaves threads alone
    torch.set_num_threads(2)
    assert main(argv) == 0 and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("posterior.threads.default_threads", lambda: 1)
    assert main(argv) == 0 and torch.get_num_threads() == 1


def test_library_sampling_leaves_torch_threads_alone(torch_threads):
    from posterior.testing import tiny_hf_prior

    torch.set_num_threads(2)
    pst.Posterior(tiny_hf_prior("llama"), pst.rewards.Sentiment(), beta=1.0).sample(n=2, max_new_tokens=2)
    assert torch.get_num_threads() == 2


# --------------------------------------------------------------------------------------------------
# item 11: no silent waits
# --------------------------------------------------------------------------------------------------
def test_rejection_progress_reports_draws_accepted_rate_and_time_left(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(output.LineProgress, "every", 0.0)  # every refresh whose text changed
    assert main(["sample", "hello", "--model", model_dir, "-n", "6", "--max-new-tokens", "4", "--method", "rejection",
                 "--reward", "contains:e", "--beta", "1", "--option", "reward_upper_bound=0", "--option", "batch_size=2",
                 "--no-prior", "--json"]) == 0  # fmt: skip
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("posterior: rejection")]
    noted = [l for l in lines if "draws " in l]
    assert noted, lines
    m = re.search(r"draws (\d+), accepted (\d+), est\. acceptance rate ([\d.e-]+), ~(\S+) left", noted[-1])
    assert m, noted[-1]
    assert int(m[1]) >= int(m[2]) and 0 < float(m[3]) <= 1


def test_rejection_progress_note_counts_and_estimates():
    from posterior.samplers.rejection import _progress_note

    seen = [[torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))]]  # two draws, each accepted w.p. 1/2
    text = _progress_note(seen, [[("x",)]], 3, [0], seconds=4.0)
    # rate 0.5; 2 more acceptances need 4 more draws at 2 s a draw: 8 s
    assert text == "draws 2, accepted 1, est. acceptance rate 0.5, ~00:08 left"


def test_train_and_compare_show_progress_on_stderr_when_not_a_terminal(model_dir, tmp_path, capsys):
    assert main(["train", "hello", "--model", model_dir, "--reward", "sentiment", "--beta", "1", "--steps", "2",
                 "--batch-size", "2", "--max-new-tokens", "3", "--lora-rank", "2", "--out", str(tmp_path / "p")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "posterior: loading" in err and re.search(r"posterior: train forward_kl \d+%", err), err
    assert "\r" not in err
    assert main(["compare", "hello", "--model", model_dir, "--methods", "is,bon", "-n", "4", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"posterior: compare \d+% \(\d/3", err) and "is done" in err, err
    assert main(["compare", "hello", "--model", model_dir, "--methods", "is", "-n", "2", "--max-new-tokens", "3",
                 "--quiet"]) == 0  # fmt: skip
    assert "posterior:" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# item 12: output details
# --------------------------------------------------------------------------------------------------
def test_train_prints_the_objective_asked_for_and_rounded_numbers(model_dir, tmp_path, capsys):
    assert main(["train", "hello", "--model", model_dir, "--reward", "sentiment", "--beta", "1", "--steps", "1",
                 "--batch-size", "2", "--max-new-tokens", "3", "--lora-rank", "2", "--out", str(tmp_path / "p"),
                 "--objective", "dpg", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("trained dpg (forward_kl) for 1 steps")
    values = re.findall(r"\(estimate, last batch\): (\S+)", out)
    assert len(values) == 6
    for v in values:  # at most 4 significant digits
        assert v in ("n/a", "nan", "inf", "-inf") or len(re.sub(r"[^0-9]", "", v.split("e")[0]).lstrip("0")) <= 4, v


def test_train_and_compare_help_show_defaults(capsys):
    for command, defaults in (("train", ["(default: 60)", "(default: dpg", "(default: 0.001)"]),
                              ("compare", ["(default: is,smc,bon)", "(default: 16)", "(default: 0.1)"])):  # fmt: skip
        assert run_cli([command, "--help"]) == 0
        text = capsys.readouterr().out
        for d in defaults:
            assert d in text, (command, d)


def test_compare_table_uses_one_number_format(model_dir, capsys):
    assert main(["compare", "hello", "--model", model_dir, "--methods", "is,bon", "-n", "4", "--max-new-tokens", "3",
                 "--quiet"]) == 0  # fmt: skip (n >= bon's best_of = 4)
    lines = capsys.readouterr().out.splitlines()
    rows = [l for l in lines if l.startswith(("is ", "bon "))]
    assert len(rows) == 2
    for row in rows:
        cells = row.split("est:")[0].split()[1:]
        for cell in cells:
            assert cell == "-" or re.fullmatch(r"-?\d+\.\d{3}|\d+|[+-]?inf|nan", cell), (cell, row)


def test_option_error_names_the_method_once(model_dir, capsys):
    assert run_cli(["sample", "hi", "--model", model_dir, "--method", "is", "--option", "bogus=1", "--quiet"]) == 2
    assert capsys.readouterr().err.count("method 'is'") == 1


def test_version_flag(capsys):
    assert run_cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"posterior {pst.__version__}"


def test_text_output_says_how_many_samples_it_shows(model_dir, capsys):
    assert main(["sample", "hello", "--model", model_dir, "-n", "6", "--max-new-tokens", "3", "--method", "is",
                 "--show", "2", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("(showing 2 of 6;") == 2  # posterior and prior samples
    assert main(["sample", "hello", "--model", model_dir, "-n", "2", "--max-new-tokens", "3", "--method", "is",
                 "--quiet"]) == 0  # fmt: skip
    assert "showing" not in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# item 13: one package; python -m posterior
# --------------------------------------------------------------------------------------------------
def test_cli_is_one_package_and_python_m_posterior_runs():
    import posterior.cli as cli

    assert os.path.basename(os.path.dirname(cli.__file__)) == "cli"
    for name in cli.SUBCOMMANDS:
        module = __import__(f"posterior.cli.{name}", fromlist=["add_parser", "run"])
        assert callable(module.add_parser) and callable(module.run)
    assert not os.path.exists(os.path.join(ROOT, "posterior", "train", "cli.py"))
    assert not os.path.exists(os.path.join(ROOT, "posterior", "compare", "cli.py"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "posterior", "--version"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == f"posterior {pst.__version__}", out.stderr
