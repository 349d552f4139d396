"""``pst.batch.run`` and ``posterior batch``: per-prompt seeds, exact lines, resume after SIGKILL, Ray.

Exact toys (``markov_prior``) for what a line holds; the tiny config-built Llama (``model_dir``)
for the command line, which a test SIGKILLs mid-run and restarts. Ray tests are marked ``ray``
(deselect with -m 'not ray'), share ONE local Ray cluster per module, and skip without ray.
"""

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import posterior as pst
from posterior.batch.jobs import prompt_seed, read_prompts
from posterior.exact import exact_posterior
from posterior.seeds import derive_seed
from posterior.testing import markov_prior, tiny_hf_prior

HAVE_RAY = importlib.util.find_spec("ray") is not None
ROOT = os.path.dirname(os.path.dirname(pst.__file__))  # the posterior under test


def env() -> dict:
    """The environment for a CLI subprocess, read when it starts: ray.init adds what a second driver
    needs to join its cluster (the auth mode) to os.environ."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def toy_post(beta=0.5):
    reward = pst.rewards.Callable(lambda texts: [t.count("a") - 0.5 * t.count("c") for t in texts], name="a-c")
    return pst.Posterior(markov_prior(), reward, beta=beta)


def lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8")]


# --- seeds ----------------------------------------------------------------------------------------
def test_prompt_seeds_are_distinct_and_below_2_63_for_any_seed():
    for seed in (0, 1, 2**63, 2**64 - 1):
        seeds = [prompt_seed(seed, i) for i in range(1000)]
        assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert prompt_seed(7, 3) == prompt_seed(7, 3) != prompt_seed(8, 3)
    assert prompt_seed(7, 3) == derive_seed(7, "batch-prompt-3")  # the library's one seed-derivation scheme
    with pytest.raises(ValueError, match="seed"):
        prompt_seed(2**64, 0)
    with pytest.raises(ValueError, match="index"):
        prompt_seed(0, -1)


# --- lines are Posterior.sample with the derived seeds ---------------------------------------------
@pytest.mark.parametrize("method,options", [("is", {}), ("smc", {"ess_threshold": 0.7}), ("mh", {"steps": 4})])
def test_each_line_equals_posterior_sample_with_the_derived_seed(tmp_path, method, options):
    post = toy_post()
    prompts = ["a", "b", "ab", "c", "bca"]
    out = tmp_path / "out.jsonl"
    rep = pst.batch.run(post, prompts, out, n=6, method=method, max_new_tokens=4, seed=11, options=options,
                        progress=False)  # fmt: skip
    assert (rep.written, rep.skipped) == (5, 0)
    got = lines(out)
    assert [g["index"] for g in got] == list(range(5)) and [g["prompt"] for g in got] == prompts
    for i, (g, prompt) in enumerate(zip(got, prompts)):
        ref = post.sample(n=6, method=method, max_new_tokens=4, prompts=[prompt], seed=prompt_seed(11, i), **options)
        assert g["seed"] == prompt_seed(11, i) and g["method"] == method
        assert [s["text"] for s in g["samples"]] == ref.texts[0]
        assert [s["log_weight"] for s in g["samples"]] == ref.log_weights[0].tolist()
        assert [s["reward"] for s in g["samples"]] == ref.rewards[0].tolist()
        assert g["ess"] == ref.ess[0].item()
        assert g["log_Z"] == (None if ref.log_Z is None else ref.log_Z[0].item())
        assert "seconds" not in json.dumps(g)  # no timing: a resumed file equals an uninterrupted one


def test_independent_prompt_seeds_give_an_unbiased_mean_of_Z(tmp_path):
    """60 copies of one prompt: each line's IS estimate of Z is unbiased and the lines are independent
    draws (distinct seeds), so their mean is within 3 standard errors of the enumerated Z."""
    post, P = toy_post(), 60
    exact = exact_posterior(post.prior, post.reward, post.beta, 3, prompt="a")
    pst.batch.run(post, ["a"] * P, tmp_path / "o.jsonl", n=8, method="is", max_new_tokens=3, seed=0, progress=False)
    got = lines(tmp_path / "o.jsonl")
    z = torch.tensor([math.exp(g["log_Z"]) for g in got], dtype=torch.float64)
    draws = {tuple(s["text"] for s in g["samples"]) for g in got}
    assert len(draws) > P // 2, "copies of one prompt must be independent runs (one seed would give 1)"
    se = z.std() / math.sqrt(P)
    assert abs(z.mean() - math.exp(exact.log_Z)) < 3 * se, (z.mean().item(), math.exp(exact.log_Z), se.item())


def test_chat_messages_are_rendered_with_the_template(tmp_path):
    prior = tiny_hf_prior("llama")
    prior.tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}>"
    post = pst.Posterior(prior, pst.rewards.Callable(lambda t: [float(len(x)) for x in t]), beta=2.0)
    path = tmp_path / "p.jsonl"
    msgs = [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n\n" + json.dumps({"prompt": "the cat"}) + "\n")
    assert read_prompts(path) == [msgs, "the cat"]
    pst.batch.run(post, path, tmp_path / "o.jsonl", n=3, method="is", max_new_tokens=5, seed=2, progress=False)
    got = lines(tmp_path / "o.jsonl")
    ref = post.sample(n=3, method="is", max_new_tokens=5, prompts=["<user>hi>"], seed=prompt_seed(2, 0))
    assert got[0]["prompt"] == msgs and [s["text"] for s in got[0]["samples"]] == ref.texts[0]
    # --chat wraps text prompts; messages are rendered once, not wrapped again
    chat_post = pst.Posterior(pst.HFPrior(prior.model, prior.tokenizer, chat=True), post.reward, beta=2.0)
    pst.batch.run(chat_post, [msgs], tmp_path / "c.jsonl", n=3, method="is", max_new_tokens=5, seed=2, progress=False)
    assert [s["text"] for s in lines(tmp_path / "c.jsonl")[0]["samples"]] == ref.texts[0]


def test_bad_prompt_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_prompts(bad)
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        read_prompts(bad)
    text = tmp_path / "p.txt"
    text.write_text("one\n\n two \n")
    assert read_prompts(text) == ["one", " two "]
    text.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(text)
    with pytest.raises(ValueError, match="workers=2 needs ray=True"):
        pst.batch.run(toy_post(), ["a"], tmp_path / "o.jsonl", workers=2)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        pst.batch.run(toy_post(), ["a"], tmp_path / "o.jsonl", method="nope")
    assert not (tmp_path / "o.jsonl").exists()


# --- resume ---------------------------------------------------------------------------------------
def test_torn_last_line_is_repaired_and_the_rest_resumed(tmp_path):
    post, prompts = toy_post(), ["a", "b", "c", "ab", "ba", "cc"]
    kw = dict(n=5, method="smc", max_new_tokens=4, seed=3, progress=False)
    full = tmp_path / "full.jsonl"
    pst.batch.run(post, prompts, full, **kw)
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl"
    (tmp_path / "cut.jsonl.meta.json").write_bytes((tmp_path / "full.jsonl.meta.json").read_bytes())
    third = data.index(b"\n", data.index(b"\n") + 1) + 1  # after two whole lines
    cut.write_bytes(data[: third + 17])  # two lines and a torn third
    rep = pst.batch.run(post, prompts, cut, **kw)
    assert (rep.skipped, rep.written) == (2, 4)
    assert cut.read_bytes() == data
    rep = pst.batch.run(post, prompts, cut, **kw)  # finished: nothing to do
    assert (rep.skipped, rep.written) == (6, 0) and cut.read_bytes() == data


def test_resume_with_a_changed_setting_is_refused_naming_it(tmp_path):
    post, prompts, out = toy_post(), ["a", "b"], tmp_path / "o.jsonl"
    kw = dict(n=4, method="is", max_new_tokens=3, seed=0, progress=False)
    pst.batch.run(post, prompts, out, **kw)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"n: was 4, now 5"):
        pst.batch.run(post, prompts, out, **{**kw, "n": 5})
    with pytest.raises(ValueError, match=r"posterior\.beta: was 0\.5, now 0\.25"):
        pst.batch.run(toy_post(beta=0.25), prompts, out, **kw)
    with pytest.raises(ValueError, match=r"prompts_sha256"):
        pst.batch.run(post, ["a", "c"], out, **kw)
    assert out.read_bytes() == before
    (tmp_path / "o.jsonl.meta.json").unlink()
    with pytest.raises(ValueError, match="settings cannot be checked"):
        pst.batch.run(post, prompts, out, **kw)


# --- the command line: SIGKILL mid-run, restart, same bytes ------------------------------------------
N_CLI_PROMPTS = 40


@pytest.fixture(scope="module")
def cli_job(model_dir, tmp_path_factory):
    """The prompts file, the command (minus --out) and the output of one uninterrupted run."""
    d = tmp_path_factory.mktemp("batch_cli")
    words = ["the cat", "a dog", "hello", "it is", "we go", "so far", "oh no", "yes", "why", "be it"]
    prompts = d / "prompts.txt"
    prompts.write_text("\n".join(f"{words[i % len(words)]} {i}" for i in range(N_CLI_PROMPTS)) + "\n")
    cmd = [sys.executable, "-m", "posterior", "batch", str(prompts), "--model", model_dir, "--reward", "sentiment",
           "--beta", "0.5", "--method", "smc", "-n", "8", "--max-new-tokens", "12", "--seed", "5"]  # fmt: skip
    ref = d / "reference.jsonl"
    t0 = time.perf_counter()
    out = subprocess.run(cmd + ["--out", str(ref), "--batch-size", "3"], env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(lines(ref)) == N_CLI_PROMPTS
    return {"cmd": cmd, "reference": ref.read_bytes(), "seconds": time.perf_counter() - t0, "dir": d}


def kill_and_resume(cmd, out, extra=(), wait_lines=3, timeout=300):
    """Start ``cmd``, SIGKILL it once ``out`` has ``wait_lines`` lines, start it again to the end.
    Returns (lines when killed, the resumed run's stderr)."""
    full = list(cmd) + ["--out", str(out), *extra]
    proc = subprocess.Popen(full, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline, have = time.monotonic() + timeout, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            have = out.read_bytes().count(b"\n") if out.exists() else 0
            if have >= wait_lines:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the driver and anything it started
        _, err = proc.communicate(timeout=60)
    assert have >= wait_lines, f"no {wait_lines} lines within {timeout} s: {err.decode()[-2000:]}"
    killed_at = out.read_bytes().count(b"\n")
    assert killed_at < N_CLI_PROMPTS, "the run finished before the kill: give it more prompts"
    resumed = subprocess.run(full, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return killed_at, resumed.stderr


def test_cli_sigkill_then_resume_equals_the_uninterrupted_run(cli_job):
    out = cli_job["dir"] / "killed.jsonl"
    killed_at, err = kill_and_resume(cli_job["cmd"], out, ["--batch-size", "1"])
    assert f"{N_CLI_PROMPTS - killed_at} prompts written" in err and f"{killed_at} already there" in err
    assert out.read_bytes() == cli_job["reference"]  # byte for byte: no line lost, repeated or torn
    assert "batch:" in err and "<" in err and ("prompt/s" in err or "s/prompt" in err)  # progress: elapsed<ETA, rate


def test_cli_refuses_a_changed_setting_on_resume(cli_job):
    out = cli_job["dir"] / "changed.jsonl"
    out.write_bytes(cli_job["reference"])
    (cli_job["dir"] / "changed.jsonl.meta.json").write_bytes((cli_job["dir"] / "reference.jsonl.meta.json").read_bytes())
    cmd = [x if x != "0.5" else "0.25" for x in cli_job["cmd"]]  # --beta 0.25
    res = subprocess.run(cmd + ["--out", str(out)], env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "beta: was 0.5, now 0.25" in res.stderr, res.stderr[-2000:]
    assert out.read_bytes() == cli_job["reference"]


# --- Ray: same lines for any batch size and worker count, and the same resume ---------------------------
@pytest.fixture(scope="module")
def ray_address():
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'posterior-align[ray]')")
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.ray
def test_ray_lines_do_not_depend_on_batch_size_or_workers(ray_address, tmp_path):
    post, prompts = toy_post(), ["a", "b", "ab", "c", "bca", "cab", "aa"]
    kw = dict(n=6, method="smc", max_new_tokens=4, seed=9, progress=False)
    pst.batch.run(post, prompts, tmp_path / "local.jsonl", **kw)
    want = (tmp_path / "local.jsonl").read_bytes()
    for batch_size, workers in [(1, 2), (3, 2), (3, 1)]:
        out = tmp_path / f"ray_{batch_size}_{workers}.jsonl"
        pst.batch.run(post, prompts, out, ray=True, workers=workers, batch_size=batch_size, **kw)
        assert out.read_bytes() == want, (batch_size, workers)


@pytest.mark.ray
def test_ray_cli_sigkill_then_resume_equals_the_uninterrupted_run(ray_address, cli_job):
    out = cli_job["dir"] / "ray_killed.jsonl"
    extra = ["--ray", "--workers", "2", "--ray-address", ray_address, "--batch-size", "2"]
    killed_at, err = kill_and_resume(cli_job["cmd"], out, extra, wait_lines=4)
    assert f"{killed_at} already there" in err
    assert out.read_bytes() == cli_job["reference"]


# --- issue 25: a resume never mixes two posteriors ---------------------------------------------------
def _cut(out, keep: int) -> bytes:
    """Leave the first ``keep`` lines of ``out`` (a run interrupted there); returns them."""
    data = out.read_bytes()
    end = 0
    for _ in range(keep):
        end = data.index(b"\n", end) + 1
    out.write_bytes(data[:end])
    return data[:end]


def _after_two_tokens(table_row_2):
    """A CallablePrior over markov_prior's vocabulary equal to it after 0 or 1 tokens; after two
    it uses ``table_row_2`` (the fingerprint's probes stop at one token: only its code differs)."""
    base = markov_prior()

    def next_logprobs(ids):
        out = base.next_logprobs(ids)
        if ids.shape[1] >= 2:
            out = torch.log_softmax(torch.tensor(table_row_2, dtype=out.dtype), -1).expand_as(out)
        return out

    return pst.CallablePrior(base.vocab, next_logprobs)


def _count(sub):
    return lambda texts: [float(t.count(sub)) for t in texts]


# Each case: (the first posterior, the resumed one, the recorded field that must be named). The
# rewards "aa"/"cc" agree on every probe text (none holds "aa" or "cc"), so only their code and
# closure tell them apart; the two priors agree on the fingerprint's one-token probes.
MIXES = {
    "another_lambda_reward": (
        lambda: pst.Posterior(markov_prior(), pst.rewards.Callable(lambda t: [float(x.count("aa")) for x in t]), beta=0.5),
        lambda: pst.Posterior(markov_prior(), pst.rewards.Callable(lambda t: [float(x.count("cc")) for x in t]), beta=0.5),
        "posterior.reward.code"),
    "a_closure_over_another_value": (
        lambda: pst.Posterior(markov_prior(), pst.rewards.Callable(_count("aa")), beta=0.5),
        lambda: pst.Posterior(markov_prior(), pst.rewards.Callable(_count("cc")), beta=0.5),
        "posterior.reward.code"),
    "another_callable_prior_same_vocabulary": (
        lambda: toy_post(), lambda: pst.Posterior(markov_prior(seed=1), toy_post().reward, beta=0.5),
        "posterior.prior.fingerprint"),
    "a_callable_prior_differing_after_two_tokens": (
        lambda: pst.Posterior(_after_two_tokens([0.0, 1.0, 2.0, 3.0]), toy_post().reward, beta=0.5),
        lambda: pst.Posterior(_after_two_tokens([3.0, 2.0, 1.0, 0.0]), toy_post().reward, beta=0.5),
        "posterior.prior.code"),
}  # fmt: skip


@pytest.mark.parametrize("given", ["posterior", "builder"])
@pytest.mark.parametrize("case", sorted(MIXES))
def test_resume_with_another_posterior_is_refused_naming_the_difference(tmp_path, case, given):
    """Issue 25.2: pst.batch.run recorded only the prior's description, the reward's name and beta
    (a builder: nothing), so each of these resumed silently and mixed two posteriors in one file."""
    first, second, field = MIXES[case]
    prompts, out = ["a", "b", "ab", "c"], tmp_path / "o.jsonl"
    kw = dict(n=4, method="is", max_new_tokens=3, seed=0, progress=False)
    as_given = (lambda build: build()) if given == "posterior" else (lambda build: build)
    pst.batch.run(as_given(first), prompts, out, **kw)
    before = _cut(out, 2)
    with pytest.raises(ValueError, match=rf"another posterior \((.*; )?{re.escape(field)}: was '[^']+', now '[^']+'") as e:
        pst.batch.run(as_given(second), prompts, out, **kw)
    assert f"delete {out} and {out}.meta.json" in str(e.value)  # how to start afresh
    assert out.read_bytes() == before
    rep = pst.batch.run(as_given(first), prompts, out, **kw)  # the same posterior resumes
    assert (rep.skipped, rep.written) == (2, 2)


def test_resume_with_another_builder_is_refused(tmp_path):
    """A builder was recorded as nothing at all: another reward (or beta) behind it resumed."""
    prompts, out = ["a", "b", "c"], tmp_path / "o.jsonl"
    kw = dict(n=4, method="is", max_new_tokens=3, seed=0, progress=False)
    pst.batch.run(lambda: toy_post(beta=0.5), prompts, out, **kw)
    _cut(out, 1)
    with pytest.raises(ValueError, match=r"posterior\.beta: was 0\.5, now 0\.25"):
        pst.batch.run(lambda: toy_post(beta=0.25), prompts, out, **kw)
    sentiment = pst.Posterior(markov_prior(), pst.rewards.Sentiment(), beta=0.5)
    with pytest.raises(ValueError, match=r"posterior\.reward\.code: .*posterior\.reward\.fingerprint: .*posterior\.reward\.name: "):
        pst.batch.run(lambda: sentiment, prompts, out, **kw)
    # an expected change (a random reward) is accepted when named; an unknown name is refused
    with pytest.raises(ValueError, match=r"allow_changes names unknown field\(s\) \['rewards'\]"):
        pst.batch.run(lambda: sentiment, prompts, out, allow_changes=("rewards",), **kw)
    rep = pst.batch.run(lambda: pst.Posterior(markov_prior(), toy_post().reward, beta=0.5), prompts, out, **kw)
    assert rep.written == 2  # the same posterior, built again, resumes


def test_resume_refusal_names_the_allow_change_for_a_random_reward(tmp_path):
    g = torch.Generator().manual_seed(0)
    noisy = pst.Posterior(markov_prior(), pst.rewards.Callable(lambda t: torch.rand(len(t), generator=g).tolist()), beta=1.0)
    prompts, out = ["a", "b"], tmp_path / "o.jsonl"
    kw = dict(n=2, method="is", max_new_tokens=2, seed=0, progress=False)
    pst.batch.run(noisy, prompts, out, **kw)
    _cut(out, 1)
    with pytest.raises(ValueError, match=r"allow_changes=\('reward.fingerprint',\) \(posterior batch: --allow-change reward.fingerprint\)"):
        pst.batch.run(noisy, prompts, out, **kw)
    assert pst.batch.run(noisy, prompts, out, allow_changes=["reward.fingerprint"], **kw).written == 1


def test_cli_resume_over_new_weights_in_the_same_model_folder_is_refused(model_dir, tmp_path, capsys):
    """The command line recorded the model by its path: new weights saved into the same folder resumed."""
    import shutil

    from posterior.cli import main

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    prompts, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    prompts.write_text("the cat\na dog\nhello\n")
    argv = ["batch", str(prompts), "--out", str(out), "--model", str(folder), "--reward", "sentiment", "--beta", "1",
            "-n", "2", "--max-new-tokens", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    before = _cut(out, 1)
    tiny_hf_prior("llama", seed=1).model.save_pretrained(folder)  # another fine-tune, same architecture
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model_files: was '" in err and f"delete {out} and {out}.meta.json" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == before


# --- issue 25.3: output that is not a regular file ---------------------------------------------------
def test_out_dev_stdout_streams_instead_of_reading_it_forever(model_dir, tmp_path):
    """`--out /dev/stdout` read the "existing output" from the pipe and hung (/dev/full: read
    zeros until memory ran out). Now: streamed, without resume and without a settings file."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the cat", "id": "a"}\n{"prompt": "a dog"}\n')
    cmd = [sys.executable, "-m", "posterior", "batch", str(prompts), "--model", model_dir, "--reward", "sentiment",
           "--beta", "1", "-n", "2", "--max-new-tokens", "3", "--quiet", "--out", "/dev/stdout"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("posterior batch --out /dev/stdout did not finish in 120 s")
    print(f"--out /dev/stdout: {time.perf_counter() - t0:.1f} s")
    assert res.returncode == 0, res.stderr[-2000:]
    got = [json.loads(x) for x in res.stdout.splitlines()]
    assert [g["index"] for g in got] == [0, 1] and got[0]["id"] == "a" and "id" not in got[1]
    assert "streaming to it (no resume" in res.stderr
    assert not os.path.exists("/dev/stdout.meta.json")


def test_out_dev_full_fails_with_one_line(model_dir, tmp_path, capsys):
    from posterior.batch.jobs import WriteError, is_stream
    from posterior.cli import main

    assert is_stream("/dev/full") and is_stream("/dev/stdout") and is_stream("/dev/fd/1") and not is_stream(tmp_path / "x")
    t0 = time.perf_counter()
    with pytest.raises(WriteError, match=r"cannot write to /dev/full: No space left on device after 0 new line\(s\)"):
        pst.batch.run(toy_post(), ["a"], "/dev/full", n=2, max_new_tokens=2, progress=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n")
    assert main(["batch", str(prompts), "--model", model_dir, "--out", "/dev/full", "-n", "2", "--max-new-tokens", "2", "--quiet"]) == 2
    print(f"--out /dev/full: library and CLI failed in {time.perf_counter() - t0:.1f} s")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("posterior: error: cannot write to /dev/full: No space left on device")
    assert not any("Traceback" in line for line in err)
    with pytest.raises(ValueError, match="is a folder"):
        pst.batch.run(toy_post(), ["a"], tmp_path, progress=False)
    with pytest.raises(ValueError, match="folder .* does not exist"):
        pst.batch.run(toy_post(), ["a"], tmp_path / "no" / "o.jsonl", progress=False)


# --- issue 25.11: damaged settings, a full disk, user ids ----------------------------------------------
@pytest.mark.parametrize("damage", [b"{\"version\": 2, \"sett", b"[1, 2]", b"\xff\xfe", b'{"version": 2, "settings": {}, "posterior": 3}'])
def test_damaged_meta_json_is_named(tmp_path, damage):
    """A damaged OUT.meta.json raised json's bare "Expecting value: line 1 column 1" (or an
    AttributeError), naming no file."""
    prompts, out = ["a", "b"], tmp_path / "o.jsonl"
    kw = dict(n=2, method="is", max_new_tokens=2, seed=0, progress=False)
    pst.batch.run(toy_post(), prompts, out, **kw)
    _cut(out, 1)
    (tmp_path / "o.jsonl.meta.json").write_bytes(damage)
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))}\.meta\.json is damaged \(.*\); it records the settings of "):
        pst.batch.run(toy_post(), prompts, out, **kw)
    (tmp_path / "o.jsonl.meta.json").write_text(json.dumps({"version": 1, "settings": {}}))  # an older posterior's
    with pytest.raises(ValueError, match=r"format 1, not 2: .* could mix two posteriors; start afresh: delete"):
        pst.batch.run(toy_post(), prompts, out, **kw)


def _full_disk_after(monkeypatch, lines: int):
    """os.write in the batch module: ``lines`` whole lines, then half a line, then ENOSPC."""
    import errno

    import posterior.batch.jobs as jobs

    real, calls = os.write, {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] <= lines:
            return real(fd, data)
        if calls["n"] == lines + 1:
            return real(fd, bytes(data)[: len(data) // 2])  # a short write: the disk fills mid-line
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(jobs.os, "write", write)
    return lambda: monkeypatch.setattr(jobs.os, "write", real)


def test_disk_full_during_batch_ends_with_one_error_and_resumes(tmp_path, monkeypatch):
    from posterior.batch.jobs import WriteError

    post, prompts = toy_post(), ["a", "b", "c", "ab", "ba"]
    kw = dict(n=3, method="smc", max_new_tokens=3, seed=4, progress=False)
    pst.batch.run(post, prompts, tmp_path / "full.jsonl", **kw)
    out = tmp_path / "o.jsonl"
    undo = _full_disk_after(monkeypatch, 2)
    with pytest.raises(WriteError, match=r"No space left on device after 2 new line\(s\) \(2 of 5 in all\); every line in it "
                                         r"is whole: run the same job again to resume") as e:  # fmt: skip
        pst.batch.run(post, prompts, out, **kw)
    assert "\n" not in str(e.value) and e.value.errno == 28
    assert out.read_bytes().count(b"\n") == 2 and out.read_bytes().endswith(b"\n")  # the half line is gone
    undo()
    rep = pst.batch.run(post, prompts, out, **kw)
    assert (rep.skipped, rep.written) == (2, 3) and out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()


def test_cli_disk_full_during_batch_is_one_line_and_resumable(model_dir, tmp_path, monkeypatch, capsys):
    from posterior.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\na dog\nhello\n")
    base = ["batch", str(prompts), "--model", model_dir, "--beta", "1", "-n", "2", "--max-new-tokens", "3", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "ref.jsonl")]) == 0
    out = tmp_path / "o.jsonl"
    undo = _full_disk_after(monkeypatch, 1)
    capsys.readouterr()
    assert main([*base, "--out", str(out)]) == 2
    err = capsys.readouterr().err  # (transformers' "Loading weights" bar aside)
    ours = [line for line in err.splitlines() if line.startswith("posterior:")]
    assert len(ours) == 1 and "No space left on device after 1 new line(s)" in ours[0] and "Traceback" not in err, err
    undo()
    assert main([*base, "--out", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_user_ids_in_batch_input_are_kept_in_the_output(tmp_path):
    """An "id" in a JSONL line was dropped: the output could not be joined back to the input."""
    path, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    rows = [{"prompt": "a", "id": "q-1"}, {"prompt": "b"}, {"prompt": "ab", "id": 17}, {"prompt": "c", "id": {"k": [1, None]}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(n=2, method="is", max_new_tokens=2, seed=0, progress=False)
    pst.batch.run(toy_post(), path, out, **kw)
    got = lines(out)
    assert [g.get("id", "<none>") for g in got] == ["q-1", "<none>", 17, {"k": [1, None]}]
    assert list(got[0])[:3] == ["index", "id", "prompt"]
    # the same rows given as a list give the same bytes; other ids are another job
    pst.batch.run(toy_post(), rows, tmp_path / "l.jsonl", **kw)
    assert (tmp_path / "l.jsonl").read_bytes() == out.read_bytes()
    _cut(out, 1)
    with pytest.raises(ValueError, match="prompts_sha256"):
        pst.batch.run(toy_post(), [{**r, "id": "x"} for r in rows], out, **kw)


@pytest.mark.ray
def test_ray_resume_with_another_builder_is_refused(ray_address, tmp_path):
    """With Ray a builder runs only in the workers: each reports the identity of what it built,
    checked (and recorded) before a task is sent."""

    def build(beta, seed=0):  # local, imports inside: Ray ships it by value (workers cannot import this module)
        from posterior.posterior import Posterior
        from posterior.rewards.base import Callable
        from posterior.testing import markov_prior

        reward = Callable(lambda texts: [t.count("a") - 0.5 * t.count("c") for t in texts], name="a-c")
        return Posterior(markov_prior(seed=seed), reward, beta=beta)

    prompts, out = ["a", "b", "ab", "c"], tmp_path / "o.jsonl"
    kw = dict(n=4, method="is", max_new_tokens=3, seed=0, progress=False, ray=True, workers=2, batch_size=1)
    pst.batch.run(lambda: build(0.5), prompts, out, **kw)
    assert "posterior" in json.loads((tmp_path / "o.jsonl.meta.json").read_text())
    before = _cut(out, 2)
    with pytest.raises(ValueError, match=r"posterior\.beta: was 0\.5, now 0\.25"):
        pst.batch.run(lambda: build(0.25), prompts, out, **kw)
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match=r"Ray worker 1 built another posterior than worker 0 \(prior\.code"):
        pst.batch.run(lambda: build(0.5, seed=os.getpid()), prompts, tmp_path / "other.jsonl", **kw)
    assert pst.batch.run(lambda: build(0.5), prompts, out, **kw).written == 2
