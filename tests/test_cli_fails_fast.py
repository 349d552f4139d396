"""The command line fails fast (issue 19, item 7): every argument of every subcommand is checked
before torch, transformers or any other heavy module is imported, so a bad argument costs a
fraction of a second instead of the ~2-4 s torch takes to import. Asserted exactly, not timed:
each command runs in a fresh interpreter, which reports the exit code, the error line and which
heavy modules it imported.

Also: ``import posterior`` is light and its public names still work (imported on first use), and
``--option`` values are checked with the samplers' own table (``posterior/samplers/options.py``),
which the samplers apply to the same values when called from Python.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "numpy", "scipy", "pyro", "triton", "matplotlib", "peft", "accelerate", "vllm",
         "fastapi", "uvicorn", "ray")  # fmt: skip

# Runs main(argv) for each argv in turn; after each, the exit code, stderr and the heavy modules
# imported so far (cumulative: a heavy import shows at the first command that caused it).
CLI_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from posterior.cli import main
    heavy, out = json.loads(sys.argv[1]), []
    for argv in json.loads(sys.argv[2]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
        out.append({"code": code, "err": err.getvalue(), "heavy": [m for m in heavy if m in sys.modules]})
    print(json.dumps(out))
""")


def fresh_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)  # fmt: skip


def run_fresh(argvs: list[list[str]]) -> list[dict]:
    proc = fresh_python(CLI_SCRIPT, json.dumps(HEAVY), json.dumps(argvs))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_fails_fast(cases, tmp_path):
    """cases: (argv, text the one error line must contain); each exits 2 with one line, no heavy import."""
    results = run_fresh([argv for argv, _ in cases])
    for (argv, expected), r in zip(cases, results):
        lines = r["err"].strip().splitlines()
        assert r["code"] == 2, (argv, r)
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r["err"], (argv, expected, r["err"])
        assert r["heavy"] == [], (argv, r["heavy"])


# --------------------------------------------------------------------------------------------------
# One test per subcommand: bad arguments exit 2 with one line, before any heavy import
# --------------------------------------------------------------------------------------------------
class TestCliFailsFast:
    def test_sample(self, tmp_path):
        assert_fails_fast([
            (["sample", "Hi", "--beta", "-1"], "posterior: error: beta must be a finite number > 0, got -1.0"),
            (["sample", "Hi", "--method", "nope"], "invalid choice: 'nope'"),
            (["sample", "Hi", "-n", "0"], "n must be a positive int, got 0"),
            (["sample", "Hi", "--max-new-tokens", "0"], "max_new_tokens must be a positive int, got 0"),
            (["sample", "Hi", "--max-new-tokens", "x"], "invalid int value: 'x'"),
            (["sample", "Hi", "--reward", "nosuch"], "unknown reward 'nosuch'"),
            (["sample", "Hi", "--reward", "length:x"], "WORDS in reward spec 'length:x' must be an int, got 'x'"),
            (["sample", "Hi", "--reward", "repetition:2:0"], "COEF in reward spec 'repetition:2:0' must be a finite number > 0"),
            (["sample", "Hi", "--reward", "sentiment:x"], "reward 'sentiment' takes no argument"),
            (["sample", "Hi", "--reward", "ensemble:mean:sentiment,length:-1"],
             "ensemble member 'length:-1' in reward spec 'ensemble:mean:sentiment,length:-1': WORDS"),
            (["sample", "Hi", "--temperature", "0"], "temperature must be a finite number > 0, got 0.0"),
            (["sample", "Hi", "--method", "smc", "--option", "ess_threshold=2"],
             "method 'smc' option ess_threshold must be a finite number in [0, 1], got 2 (--option ess_threshold=2)"),
            (["sample", "Hi", "--method", "smc", "--option", "resampling=foo"],
             "method 'smc' option resampling must be one of ['multinomial', 'residual', 'stratified', 'systematic'], "
             "got 'foo' (--option resampling=\"foo\")"),
            (["sample", "Hi", "--method", "smc", "--option", "resample=foo"], "method 'smc' has no option(s) ['resample']"),
            (["sample", "Hi", "--method", "bon", "--option", "best_of=many"],
             "method 'bon' option best_of must be a positive int, got 'many' (--option best_of=\"many\")"),
            (["sample", "Hi", "--method", "mh", "--option", "burn_in=16"],
             "method 'mh': burn_in must be < steps=16, got 16 (--option burn_in=16)"),
            (["sample", "Hi", "--method", "is", "--option", "proposal=x"], "option proposal takes a Python object"),
            (["sample", "Hi", "--twist", str(tmp_path)], "--twist applies to --method smc"),
            (["sample", "Hi", "--model", str(tmp_path / "missing")], "no such folder"),
        ], tmp_path)  # fmt: skip

    def test_train(self, tmp_path):
        out = ["--out", str(tmp_path / "p")]
        assert_fails_fast([
            (["train", "Hi", "--beta", "-1", *out], "beta must be a finite number > 0, got -1.0"),
            (["train", "Hi", "--objective", "nope", *out], "invalid choice: 'nope'"),
            (["train", "Hi", "--objective", "ctl", *out], "--objective ctl trains a twist: add --twist"),
            (["train", "Hi", "--steps", "0", *out], "steps must be a positive int, got 0"),
            (["train", "Hi", "--objective", "dpg", "--batch-size", "1", *out], "batch_size must be an int >= 2, got 1"),
            (["train", "Hi", "--lr", "0", *out], "lr must be a finite number > 0, got 0.0"),
            (["train", "Hi", "--backend", "vllm", *out], "posterior train runs on --backend hf"),
            (["train", "Hi"], "give --out (or --checkpoint-dir)"),
        ], tmp_path)  # fmt: skip

    def test_compare(self, tmp_path):
        assert_fails_fast([
            (["compare", "Hi", "--methods", ""], "--methods '' names no method"),
            (["compare", "Hi", "--methods", "is,nope"], "unknown method 'nope'"),
            (["compare", "Hi", "-n", "1"], "n must be an int >= 2, got 1"),
            (["compare", "Hi", "-n", "2"], "method 'bon': best_of=4 exceeds -n 2"),  # bon's default best_of
            (["compare", "Hi", "--beta", "-1"], "beta must be a finite number > 0, got -1.0"),
            (["compare", "Hi", "--option", "bon.best_of=0.5"],
             "method 'bon' option best_of must be a positive int, got 0.5 (--option bon.best_of=0.5)"),
            (["compare", "Hi", "--option", "smc.ess_threshold=-1"], "(--option smc.ess_threshold=-1)"),
            (["compare", "Hi", "--plot", str(tmp_path)], "is a folder"),
        ], tmp_path)  # fmt: skip

    def test_batch(self, tmp_path):
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("Hi\n")
        base = ["batch", str(prompts), "--out", str(tmp_path / "out.jsonl")]
        assert_fails_fast([
            ([*base, "-n", "0"], "n must be a positive int, got 0"),
            ([*base, "--max-new-tokens", "0"], "max_new_tokens must be a positive int, got 0"),
            ([*base, "--beta", "-1"], "beta must be a finite number > 0, got -1.0"),
            ([*base, "--method", "nope"], "invalid choice: 'nope'"),
            ([*base, "--method", "smc", "--option", "ess_threshold=2"], "option ess_threshold must be a finite number in [0, 1]"),
            ([*base, "--workers", "2"], "workers=2 needs ray=True"),
            (["batch", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.jsonl")], "does not exist"),
        ], tmp_path)  # fmt: skip
        assert not (tmp_path / "out.jsonl").exists()

    def test_serve(self, tmp_path):
        assert_fails_fast([
            (["serve", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
            (["serve", "--max-n", "0"], "max_n must be a positive int"),
            (["serve", "--batch-window-ms", "-1"], "--batch-window-ms must be >= 0"),
            (["serve", "--chat"], "posterior serve takes no --chat"),
            (["serve", "--top-p", "2"], "top_p must be a number in (0, 1] or None, got 2.0"),
        ], tmp_path)  # fmt: skip

    def test_overopt(self, tmp_path):
        assert_fails_fast([
            (["overopt", "Hi", "--methods", "foo"], "unknown method 'foo'"),
            (["overopt", "Hi", "--betas", "-1"], "takes comma-separated finite numbers > 0"),
            (["overopt", "Hi", "-n", "1"], "n must be an int >= 2, got 1"),
            (["overopt", "Hi", "--gold", "nosuch"], "--gold: unknown reward 'nosuch'"),
            (["overopt", "Hi", "--smc-option", "ess_threshold=2"],
             "method 'smc' option ess_threshold must be a finite number in [0, 1], got 2 (--smc-option ess_threshold=2)"),
        ], tmp_path)  # fmt: skip

    def test_help_and_version_import_nothing_heavy(self):
        argvs = [["--help"], ["--version"]] + [[c, "--help"] for c in ("sample", "train", "compare", "batch", "serve", "overopt")]
        for argv, r in zip(argvs, run_fresh(argvs)):
            assert r["code"] == 0 and r["heavy"] == [], (argv, r)

    def test_python_m_posterior_exits_2_with_one_line(self):
        proc = fresh_python("import runpy; runpy.run_module('posterior', run_name='__main__')", "sample", "Hi", "--beta", "-1")
        assert proc.returncode == 2 and proc.stderr == "posterior: error: beta must be a finite number > 0, got -1.0\n"


# --------------------------------------------------------------------------------------------------
# import posterior is light; its public names work on first use
# --------------------------------------------------------------------------------------------------
def test_import_posterior_imports_no_torch_and_its_names_load_on_use():
    code = textwrap.dedent("""
        import sys
        import posterior as pst
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "import posterior loaded torch"
        assert pst.__version__ and set(pst.__all__) <= set(dir(pst))
        from posterior import Posterior
        assert "torch" in sys.modules and pst.Posterior is Posterior
        assert pst.rewards.Sentiment.__name__ == "Sentiment" and callable(pst.twists.learned) and callable(pst.train.fit)
        for name in pst.__all__:
            getattr(pst, name)
        print("ok")
    """)
    proc = fresh_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_functions_named_like_their_modules_stay_functions_whatever_is_imported_first():
    """pst.compare, pst.generate and pst.twists.learned are functions defined in modules of the
    same name; importing those modules first (as tests and users do) must not replace them."""
    code = textwrap.dedent("""
        import posterior as pst
        from posterior.compare.report import compare
        from posterior.generate import generate
        from posterior.twists.learned import learned
        import posterior.compare, posterior.generate, posterior.twists.learned
        assert pst.compare is compare and pst.generate is generate and pst.twists.learned is learned
        assert sorted(pst.twists.KINDS) == ["head", "tabular"] and sorted(pst.SAMPLERS) == sorted(pst.samplers.SAMPLERS)
        print("ok")
    """)
    proc = fresh_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_every_name_of_the_public_api_resolves():
    import posterior as pst

    for name in ("Posterior", "HFPrior", "CallablePrior", "VLLMPrior", "Prior", "load_default_prior", "SampleResult",
                 "DegenerateWeightsError", "CheckpointError", "RewardError", "Bounds", "bounds", "compare", "generate",
                 "GenerateOutput", "overoptimization", "SAMPLERS", "register_sampler"):  # fmt: skip
        assert getattr(pst, name) is not None, name
    for name in ("Sentiment", "Contains", "Callable", "Ensemble", "from_trl", "from_spec", "REWARDS"):
        assert getattr(pst.rewards, name) is not None, name
    for name in ("policy_from", "fit", "load_policy", "OBJECTIVES", "ALIASES"):
        assert getattr(pst.train, name) is not None, name
    for name in ("from_reward", "Callable", "learned", "load", "Twist", "HeadTwist", "TabularTwist"):
        assert getattr(pst.twists, name) is not None, name
    assert pst.batch.run is not None and pst.overopt.METHODS == ("is", "smc", "bon")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pst.nope  # noqa: B018


# --------------------------------------------------------------------------------------------------
# --option: one table of checks, used by the command line and by the samplers
# --------------------------------------------------------------------------------------------------
BAD_OPTIONS = [  # (method, option, value): values the table refuses
    ("smc", "ess_threshold", 2), ("smc", "ess_threshold", "high"), ("smc", "resampling", "foo"), ("smc", "lookahead", 0),
    ("smc", "block_size", 1.5), ("smc", "proposal", "greedy"), ("smc", "twist", "foo"), ("smc", "decode_ahead", 0),
    ("smc", "check_twist", 1), ("smc", "return_ancestry", "yes"), ("bon", "best_of", 0), ("soft_bon", "best_of", True),
    ("mh", "move", "jump"), ("mh", "mixture_weight", 1.5), ("mh", "steps", 0), ("mh", "burn_in", -1), ("mh", "thin", 0),
    ("mh", "samples", "some"), ("pgibbs", "particles", 0), ("pgibbs", "ess_threshold", -0.1),
    ("rejection", "batch_size", 0), ("rejection", "max_draws", 2.5), ("qrs", "log_bound", "x"), ("qrs", "batch_size", "8"),
]  # fmt: skip


def _table_message(method, option, value) -> str:
    from posterior.samplers.options import check_option

    with pytest.raises(ValueError) as e:
        check_option(method, option, value)
    return str(e.value)


@pytest.mark.parametrize("method, option, value", BAD_OPTIONS, ids=[f"{m}.{o}={v!r}" for m, o, v in BAD_OPTIONS])
def test_bad_option_value_fails_on_the_command_line_and_in_the_sampler_alike(method, option, value):
    """The CLI's error names the option and the value; the sampler, called from Python, refuses the
    same value with the same message (one source: posterior/samplers/options.py)."""
    import posterior as pst
    from posterior.cli.options import check_method_options
    from posterior.testing import two_token_prior

    expected = _table_message(method, option, value)
    assert expected.startswith(f"{option} must be") and repr(value) in expected
    with pytest.raises(ValueError) as cli:
        check_method_options(method, [(option, value)])
    assert str(cli.value) == f"method {method!r} option {expected} (--option {option}={json.dumps(value)})"
    post = pst.Posterior(two_token_prior(), pst.rewards.Callable(lambda ts: [0.0] * len(ts)), beta=1.0)
    extra = {"reward_upper_bound": 1.0} if method == "rejection" else {}
    with pytest.raises(ValueError) as lib:
        post.sample(n=2, method=method, max_new_tokens=2, **{option: value, **extra})
    assert expected in str(lib.value)


def test_unknown_option_name_and_library_only_options():
    import posterior as pst
    from posterior.cli.options import check_method_options
    from posterior.testing import two_token_prior

    with pytest.raises(ValueError, match=r"method 'smc' has no option\(s\) \['resample'\]; its options are \["):
        check_method_options("smc", [("resample", "foo")])
    with pytest.raises(TypeError, match=r"method 'smc' has no option\(s\) \['resample'\]"):
        pst.Posterior(two_token_prior(), pst.rewards.Callable(lambda ts: [0.0] * len(ts)), beta=1.0).sample(
            n=2, method="smc", max_new_tokens=2, resample="foo")  # fmt: skip
    for method, option in (("is", "proposal"), ("qrs", "proposal"), ("mh", "init_texts"), ("smc", "callback"),
                           ("mh", "callback"), ("pgibbs", "callback"), ("smc", "reference")):  # fmt: skip
        with pytest.raises(ValueError, match=f"option {option} takes a Python object"):
            check_method_options(method, [(option, None)])


def test_good_option_values_come_back_as_the_sampler_takes_them():
    from posterior.cli.options import check_method_options

    assert check_method_options("smc", [("ess_threshold", 1), ("twist", None), ("resampling", "multinomial")]) == {
        "ess_threshold": 1.0, "twist": None, "resampling": "multinomial"}  # fmt: skip
    assert check_method_options("smc", [("twist", "auto"), ("decode_ahead", 3)]) == {"twist": "auto", "decode_ahead": 3}
    assert check_method_options("mh", [("steps", 4), ("burn_in", 3)]) == {"steps": 4, "burn_in": 3}
    with pytest.raises(ValueError, match=r"method 'mh': burn_in must be < steps=4, got 4 \(--option steps=4 --option burn_in=4\)"):
        check_method_options("mh", [("steps", 4), ("burn_in", 4)])
    with pytest.raises(ValueError, match="burn_in must be < steps=8"):
        check_method_options("pgibbs", [("steps", 8), ("burn_in", 8)])


def test_option_table_matches_the_samplers_signatures_and_registries():
    """The table is the samplers' options (same names, order and defaults) for every built-in
    sampler, and its choices are the registries' names."""
    from posterior.kernels.schemes import RESAMPLERS
    from posterior.samplers import SAMPLERS, sampler_options
    from posterior.samplers.mh import MOVES
    from posterior.samplers.options import METHOD_OPTIONS, PROPOSALS, RESAMPLING
    from posterior.samplers.options import MOVES as TABLE_MOVES
    from posterior.samplers.smc_model import PROPOSALS as SMC_PROPOSALS

    assert set(METHOD_OPTIONS) <= set(SAMPLERS)
    for method, table in METHOD_OPTIONS.items():
        assert list(sampler_options(method).items()) == [(k, o.default) for k, o in table.items()], method
    assert tuple(sorted(RESAMPLERS)) == RESAMPLING and tuple(sorted(MOVES)) == TABLE_MOVES
    assert SMC_PROPOSALS is PROPOSALS


def test_objective_names_are_the_training_tables():
    from posterior.train.objective_names import ALIASES, POLICY_OBJECTIVES, TWIST_OBJECTIVES
    from posterior.train.objectives import OBJECTIVES, get_objective
    from posterior.train.twist_objectives import TWIST_OBJECTIVES as TWIST_TABLE

    assert list(OBJECTIVES) == list(POLICY_OBJECTIVES) and tuple(TWIST_TABLE) == TWIST_OBJECTIVES
    assert all(OBJECTIVES[k].on_policy == kind.on_policy and OBJECTIVES[k].uses_log_Z == kind.uses_log_Z
               for k, kind in POLICY_OBJECTIVES.items())  # fmt: skip
    assert get_objective("dpg").name == ALIASES["dpg"] == "forward_kl"
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        get_objective("nope")


# --------------------------------------------------------------------------------------------------
# Output paths (issue 25 item 6): every path a subcommand writes is checked before any work
# --------------------------------------------------------------------------------------------------
def _unwritable_folders(tmp_path) -> list[str]:
    """Existing folders that take no new files here: a pseudo file system (/sys: EACCES, also for
    root), and a folder without write permission where permissions bind (not for root)."""
    out = []
    if os.path.isdir("/sys") and _refuses_files("/sys"):
        out.append("/sys")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if _refuses_files(str(locked)):
        out.append(str(locked))
    return out


def _refuses_files(folder: str) -> bool:
    try:
        open(os.path.join(folder, ".posterior-test-probe"), "wb").close()
    except OSError:
        return True
    os.unlink(os.path.join(folder, ".posterior-test-probe"))
    return False


def test_unwritable_output_path_fails_before_any_work(tmp_path):
    """``posterior train --out UNWRITABLE`` trained for minutes and only then said "the policy was not
    saved"; ``--plot`` onto a read-only folder or a device swept, then failed. Now every output path
    of every subcommand that writes (train --out and --checkpoint-dir; compare and overopt --plot;
    batch --out is checked by posterior/cli/batch.py) fails at once, exit 2, one line, nothing heavy
    imported (so no model loaded)."""
    folders = _unwritable_folders(tmp_path)
    if not folders:
        pytest.skip("no folder here refuses new files (not Linux, and permissions do not bind)")
    cases = []
    for folder in folders:
        sub = os.path.join(folder, "posterior-test", "policy")  # a folder to create inside it
        cases += [
            (["train", "Hi", "--out", sub], f"--out {sub!r} cannot be written: folder {folder!r} takes no new files"),
            (["train", "Hi", "--out", folder], f"--out {folder!r} cannot be written: it takes no new files"),
            (["train", "Hi", "--twist", "--checkpoint-dir", sub, "--out", str(tmp_path / "t")],
             f"--checkpoint-dir {sub!r} cannot be written"),
            (["train", "Hi", "--checkpoint-dir", sub], f"--checkpoint-dir {sub!r} cannot be written"),
            (["compare", "Hi", "--plot", os.path.join(folder, "f.png")], "takes no new files"),
            (["overopt", "Hi", "--plot", os.path.join(folder, "o.png")], "takes no new files"),
        ]  # fmt: skip
    cases += [
        (["compare", "Hi", "--plot", "/dev/full"], "--plot '/dev/full' is not a regular file"),
        (["overopt", "Hi", "--plot", "/dev/null"], "--plot '/dev/null' is not a regular file"),
        (["overopt", "Hi", "--plot", str(tmp_path / "no" / "o.png")], "does not exist"),
        (["overopt", "Hi", "--plot", str(tmp_path)], "is a folder; give a file name such as overopt.png"),
    ]  # fmt: skip
    assert_fails_fast(cases, tmp_path)
    assert not any(name.startswith(".posterior-write-check") for name in os.listdir(tmp_path))


def test_output_path_checks_accept_what_can_be_written_and_create_nothing(tmp_path):
    from posterior.validate import check_output_file, check_output_folder

    new = tmp_path / "a" / "b" / "policy"
    assert check_output_folder("--out", new) == str(new) and not (tmp_path / "a").exists()
    assert check_output_file("--plot", tmp_path / "p.png") == str(tmp_path / "p.png") and os.listdir(tmp_path) == []
    (tmp_path / "p.png").write_bytes(b"old")
    check_output_file("--plot", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes() == b"old" and os.listdir(tmp_path) == ["p.png"]
    with pytest.raises(ValueError, match=r"--out '.*p.png/x' is inside '.*p.png', which is a file, not a folder"):
        check_output_folder("--out", tmp_path / "p.png" / "x")
    with pytest.raises(ValueError, match=r"--plot '.*p.png/x.png': folder '.*p.png' cannot exist: '.*p.png' is a file"):
        check_output_file("--plot", tmp_path / "p.png" / "x.png")


def test_huge_n_model_file_and_lora_rank_with_twist_fail_before_any_work(tmp_path):
    """Issue 25 item 11: ``-n 100000000000`` went on to allocate (the sampler's tensors alone need
    terabytes); ``--model FILE`` failed inside transformers ("the config file ... is not a valid
    JSON file"); ``--lora-rank`` with ``--twist`` was silently ignored. Each now fails at once."""
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"not a model")
    out = ["--out", str(tmp_path / "p")]
    assert_fails_fast([
        (["sample", "Hi", "-n", "100000000000"], "-n 100000000000: 100000000000 sequences x 1 prompt(s) need at least"),
        (["sample", "Hi", "-n", "100000000000"], "GiB of memory"),
        (["compare", "Hi", "-n", "100000000000"], "-n 100000000000: 100000000000 sequences"),
        (["overopt", "Hi", "-n", "100000000000"], "-n 100000000000: 100000000000 sequences"),
        (["overopt", "Hi", "--smc-n", "100000000000"], "--smc-n 100000000000: 100000000000 sequences"),
        (["train", "Hi", "--batch-size", "100000000000", *out], "--batch-size 100000000000: 100000000000 sequences"),
        (["sample", "Hi", "--model", str(model_file)], f"--model {str(model_file)!r} is a file, not a folder"),
        (["train", "Hi", "--twist", "--lora-rank", "4", *out], "--lora-rank 4 sets a policy's adapter; --twist trains a twist"),
        (["train", "Hi", "--twist", "--lora-rank", "0", *out], "--lora-rank 0 sets a policy's adapter"),
    ], tmp_path)  # fmt: skip


def test_n_within_memory_passes_the_check():
    from argparse import Namespace

    from posterior.cli.options import check_memory

    check_memory(Namespace(prompts=["a", "b"], max_new_tokens=32, model=None), "-n", 4096)  # 4096 x 2 x ~196 KB: 1.6 GB
