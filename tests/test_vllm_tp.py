"""vLLM tensor parallelism on this machine's CPU build: TP=2 agrees with TP=1, ends, leaves nothing.

A config-built Llama with 4 attention heads (2 KV heads), so its heads split over 2 workers,
saved to a temporary folder. One subprocess (hard timeout; its whole process group is killed if it
runs over) starts a TP=1 engine, runs block SMC and IS, closes it and waits for its processes to
end, then does the same with a TP=2 engine — one engine at a time, to keep memory low. The test
compares the two runs and checks every engine process is gone.

Agreement: vLLM's seeded sampling gives the same tokens for the same seed; TP=2 splits each matmul
over two workers and all-reduces partial sums, so log-probs can differ from TP=1 in the last bits
of float32 (a different summation order). We therefore require identical texts and log Z / log
weights within LOG_TOL, and report the largest difference.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import posterior as pst

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
HARD_TIMEOUT_S = 900  # both engines (40 s each to start on a quiet machine, 200 s under load) and their runs
LOG_TOL = 1e-3  # nats: log Z and log-weights, float32 with a different reduction order under TP

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, psutil, torch
    import posterior as pst
    from posterior.priors.vllm import VLLMPrior

    def kids():
        return {c.pid for c in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(c.cmdline())}

    def alive(pids):
        out = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def rss_mib(pids):
        total = psutil.Process().memory_info().rss
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    if __name__ == "__main__":
        folder, tp = sys.argv[1], int(sys.argv[2])
        reward = pst.rewards.Callable(lambda texts: [t.count("e") - 0.5 * t.count("z") for t in texts], name="e-z")
        prompts = ["the cat", "we go"]
        before = kids()
        t0 = time.perf_counter()
        prior = VLLMPrior.from_pretrained(folder, tensor_parallel_size=tp, max_model_len=256,
                                          kv_cache_memory_bytes=256 * 2**20)
        start_s = time.perf_counter() - t0
        pids = sorted(kids() - before)
        post = pst.Posterior(prior, reward, beta=0.5)
        out = {"tp": tp, "start_s": start_s, "pids": pids, "rss_mib": rss_mib(pids),
               "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}
        t0 = time.perf_counter()
        for name, kw in [("smc", {"block_size": 4}), ("is", {})]:
            res = post.sample(n=8, method=name, max_new_tokens=12, prompts=prompts, seed=3, **kw)
            out[name] = {"texts": res.texts, "log_Z": res.log_Z.tolist(), "log_weights": res.log_weights.tolist(),
                         "rewards": res.rewards.tolist(), "log_prior": res.log_prior.tolist()}
        out["sample_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prior.close()
        deadline = time.monotonic() + 60
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        out["close_s"] = time.perf_counter() - t0
        out["left_after_close"] = alive(pids)
        print("RESULT" + json.dumps(out), flush=True)
    """
)


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def four_head_llama(tmp_path_factory):
    """A randomly initialised Llama with 4 query heads of size 64 and 2 KV heads (divisible by TP=2)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from posterior.testing import char_tokenizer

    tok = char_tokenizer()
    # head_dim 64: vllm-cpu's attention kernels have no head_dim 16 ("Unsupported CPU attention configuration")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, architectures=["LlamaForCausalLM"])  # fmt: skip
    torch.manual_seed(0)  # a throwaway test model's weights
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # sharpen the EOS logit so sequences end at varied lengths
        model.get_output_embeddings().weight[2] *= 3.0
    path = tmp_path_factory.mktemp("llama4h")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _run(folder, tp: int, script) -> dict:
    root = os.path.dirname(os.path.dirname(pst.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "VLLM_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # from_pretrained must set it
    proc = subprocess.Popen([sys.executable, str(script), folder, str(tp)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=HARD_TIMEOUT_S / 2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and every engine process it started
        proc.communicate()
        pytest.fail(f"TP={tp}: no result within {HARD_TIMEOUT_S / 2:.0f} s (a hang)")
    assert proc.returncode == 0, err[-4000:]
    res = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT"))[6:])
    assert res["pids"], f"TP={tp}: the engine started no process?"
    assert not res["left_after_close"], f"TP={tp}: engine processes {res['left_after_close']} left after close()"
    deadline = time.monotonic() + 30
    while _alive(res["pids"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(res["pids"]), f"TP={tp}: engine processes {_alive(res['pids'])} outlived their parent"
    return res


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (README: vLLM backend)")
def test_tensor_parallel_2_agrees_with_1_and_leaves_no_process(four_head_llama, tmp_path):
    script = tmp_path / "tp_run.py"
    script.write_text(SCRIPT)
    t0 = time.perf_counter()
    one = _run(four_head_llama, 1, script)  # one engine at a time: each is closed before the next starts
    two = _run(four_head_llama, 2, script)
    wall = time.perf_counter() - t0
    assert len(two["pids"]) > len(one["pids"]), (one["pids"], two["pids"])  # TP=2 has a worker per rank
    assert two["bind"] is None, "from_pretrained must not leave VLLM_CPU_OMP_THREADS_BIND set"
    worst = {}
    for method in ("smc", "is"):
        a, b = one[method], two[method]
        assert a["texts"] == b["texts"], f"{method}: TP=2 drew other texts than TP=1"
        assert a["rewards"] == b["rewards"]
        worst[method] = max(
            abs(x - y)
            for key in ("log_Z", "log_weights", "log_prior")
            for x, y in zip(_flat(a[key]), _flat(b[key]))
        )
        assert worst[method] < LOG_TOL, (method, worst[method])
    print(f"\nTP test: wall {wall:.0f} s; engine start TP=1 {one['start_s']:.0f} s, TP=2 {two['start_s']:.0f} s; "
          f"sampling {one['sample_s']:.1f} / {two['sample_s']:.1f} s; close {one['close_s']:.1f} / {two['close_s']:.1f} s; "
          f"RSS {one['rss_mib']:.0f} / {two['rss_mib']:.0f} MiB; max |diff| log Z/weights/prior: {worst}")  # fmt: skip


def _flat(x):
    return [v for row in x for v in (row if isinstance(row, list) else [row])]


# --- no engine needed -----------------------------------------------------------------------------
def test_threads_bind_splits_the_allowed_cores_per_worker():
    from posterior.priors.vllm import threads_bind

    assert threads_bind([1, 0], 2) == "0|1"
    assert threads_bind(range(8), 2) == "0,1,2,3|4,5,6,7"
    assert threads_bind(range(5), 2) == "0,1,2|3,4"
    with pytest.raises(ValueError, match=r"VLLM_CPU_OMP_THREADS_BIND"):
        threads_bind([0, 1], 4)


@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")
def test_pipeline_parallel_is_refused_on_vllm_cpu_0_32(four_head_llama):
    import vllm
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() and vllm.__version__.startswith("0.32.")):
        pytest.skip("the refusal is for vllm-cpu 0.32")
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2 .* dies at the first request"):
        pst.VLLMPrior.from_pretrained(four_head_llama, pipeline_parallel_size=2)


def test_threads_bind_is_set_only_while_the_engine_starts_and_only_where_needed(monkeypatch):
    import posterior.priors.vllm as pv

    monkeypatch.delenv(pv.THREADS_BIND, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(pv, "_numa_nodes_with", lambda cores: 1)
    with pv._cpu_threads_bind(2):
        assert os.environ[pv.THREADS_BIND] == "0|1"  # what the engine processes inherit
    assert pv.THREADS_BIND not in os.environ
    with pv._cpu_threads_bind(1):  # one worker: vLLM binds it itself
        assert pv.THREADS_BIND not in os.environ
    monkeypatch.setattr(pv, "_numa_nodes_with", lambda cores: 2)
    with pv._cpu_threads_bind(2):  # a NUMA node per worker: vLLM's own binding works
        assert pv.THREADS_BIND not in os.environ
    monkeypatch.setattr(pv, "_numa_nodes_with", lambda cores: 1)
    monkeypatch.setenv(pv.THREADS_BIND, "1|0")
    with pv._cpu_threads_bind(2):  # the user's choice stands
        assert os.environ[pv.THREADS_BIND] == "1|0"
    assert os.environ[pv.THREADS_BIND] == "1|0"
    monkeypatch.delenv(pv.THREADS_BIND)
    with pytest.raises(ValueError, match="need at least 4 cores"):
        with pv._cpu_threads_bind(4):
            pass
