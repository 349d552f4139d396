"""``pst.batch.run`` and ``posterior batch``: per-prompt seeds, exact lines, resume after SIGKILL, Ray.

Exact toys (``markov_prior``) for what a line holds; the tiny config-built Llama (``model_dir``)
for the command line, which a test SIGKILLs mid-run and restarts. Ray tests are marked ``ray``
(deselect with -m 'not ray'), share ONE local Ray cluster per module, and skip without ray.
"""

import importlib.util
import json
import math
import os
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
