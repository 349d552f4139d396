"""VLLMPrior: the default model served by vLLM agrees with the same weights in transformers.

Engine tests are marked ``vllm`` and ``slow`` and skipped when vllm is not installed; they share
ONE engine (module fixture, ~30-45 s to start on 2 CPU cores), closed by the last test. vllm is
never imported at collection, so other test files do not pay for it. The tests at the top need
no engine (validation against a stand-in ``llm`` object).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import posterior as pst
from posterior.priors.vllm import VLLMPrior, _chosen_logprobs

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def needs_engine(test):
    """Marks ``vllm`` and ``slow``; skipped without vllm."""
    skip = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (README: vLLM backend)")
    return pytest.mark.vllm(pytest.mark.slow(skip(test)))


TOL = 1e-3  # per-token log-prob agreement, float32 on both sides


# --- no engine needed -----------------------------------------------------------------------------
class _Tokenizer:
    eos_token_id, bos_token_id, chat_template = 2, 1, None

    def get_vocab(self):
        return {"a": 0, "b": 1, "</s>": 2}


def _stand_in(logprobs_mode: str):
    config = SimpleNamespace(
        logprobs_mode=logprobs_mode, max_model_len=64, model="stand-in",
        get_vocab_size=lambda: 3, try_get_generation_config=lambda: {"eos_token_id": 2},
    )  # fmt: skip
    return SimpleNamespace(model_config=config, get_tokenizer=_Tokenizer)


def test_import_posterior_does_not_import_vllm():
    code = "import sys, posterior; posterior.VLLMPrior; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_modified_prior_needs_processed_logprobs_engine():
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMPrior(_stand_in("raw_logprobs"), temperature=0.7)
    with pytest.raises(ValueError, match="raw_logits"):
        VLLMPrior(_stand_in("raw_logits"))
    prior = VLLMPrior(_stand_in("raw_logprobs"))  # unmodified: raw == processed
    assert prior.eos_token_ids == (2,) and prior.max_length == 64 and prior.vocab_size == 3


def test_scoring_refuses_what_vllm_cannot_compute():
    tokens, lengths = torch.zeros(1, 1, 2, dtype=torch.long), torch.ones(1, 1, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="no autograd graph"):
        VLLMPrior(_stand_in("processed_logprobs")).token_log_probs([[0]], tokens, lengths, grad=True)
    with pytest.raises(ValueError, match="unmodified model"):
        VLLMPrior(_stand_in("processed_logprobs"), top_k=5).token_log_probs([[0]], tokens, lengths)


def test_load_default_prior_rejects_misplaced_options():
    with pytest.raises(ValueError, match="backend"):
        pst.load_default_prior(backend="tgi")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        pst.load_default_prior(tensor_parallel_size=2)  # engine kwargs without backend="vllm"


# --- one shared engine ------------------------------------------------------------------------------
def _children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True)}


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(pid)  # multiprocessing's resource tracker lives until this process exits
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def vprior():
    try:
        before = _children()
        prior = pst.load_default_prior(backend="vllm")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    prior.engine_pids = _children() - before  # for test_close_leaves_no_engine_process
    yield prior
    prior.close()


@pytest.fixture(scope="module")
def hprior():
    return pst.load_default_prior()


PROMPTS = ["The movie was", "Once upon a time"]


@needs_engine
def test_same_token_ids_vocabulary_and_eos_as_hf(vprior, hprior):
    assert vprior.vocabulary_key() == hprior.vocabulary_key()
    assert vprior.eos_token_ids == hprior.eos_token_ids
    assert vprior.encode_prompts(PROMPTS) == hprior.encode_prompts(PROMPTS)
    assert vprior.encode_prompts(None) == hprior.encode_prompts(None)
    assert vprior.vocab_size == hprior.vocab_size and vprior.max_length == hprior.max_length == 8192


@needs_engine
def test_sampled_log_probs_agree_with_hf(vprior, hprior):
    ids = vprior.encode_prompts(PROMPTS)
    cont = vprior.sample(ids, 8, 24, generator=torch.Generator().manual_seed(0))
    assert cont.tokens.shape[:2] == (2, 8) and cont.tokens.shape[2] == int(cont.lengths.max())
    hf_tok = hprior.token_log_probs(ids, cont.tokens, cont.lengths)  # (P, N, T)
    hf = hf_tok.double().sum(-1)
    assert torch.isfinite(cont.log_prob).all()
    assert (hf - cont.log_prob.double()).abs().max() < TOL, (hf - cont.log_prob).abs().max()
    eos = set(vprior.eos_token_ids)
    for p in range(2):
        for i in range(8):
            L = int(cont.lengths[p, i])
            seq = cont.tokens[p, i].tolist()
            assert all(t not in eos for t in seq[: L - 1]), "EOS inside a sequence"
            assert L == 24 or seq[L - 1] in eos, "a sequence ended early without EOS"
            assert all(t == vprior.eos_token_ids[0] for t in seq[L:]), "padding after the end is not EOS"


@needs_engine
def test_extension_log_probs_agree_with_hf_token_by_token(vprior, hprior):
    ids = vprior.encode_prompts(PROMPTS)
    prompts = [ids[0], ids[1], ids[0], ids[1]]
    prefixes = [[], [28, 564], [253, 2394, 28], []]
    ext = vprior.continue_prefixes(prompts, prefixes, [20, 20, 20, 20], generator=torch.Generator().manual_seed(1))
    full = [list(p) + x for p, x in zip(prompts, prefixes)]
    hf = torch.stack([
        hprior.token_log_probs([full[b]], ext.tokens[b].view(1, 1, -1), ext.lengths[b].view(1, 1))[0, 0]
        for b in range(4)
    ])  # fmt: skip
    assert (hf - ext.token_log_probs).abs().max() < TOL, (hf - ext.token_log_probs).abs().max()


@needs_engine
def test_token_log_probs_agree_with_hf(vprior, hprior):
    ids = hprior.encode_prompts(PROMPTS)
    cont = hprior.sample(ids, 4, 16, generator=torch.Generator().manual_seed(2))
    lengths = cont.lengths.clone()
    lengths[0, 0] = 0  # an empty continuation scores 0
    lengths[1, 1] = min(3, int(lengths[1, 1]))  # shorter than its tokens
    tokens = cont.tokens.clone()
    tokens[0, 1] = tokens[0, 2]  # a duplicate row (scored once) with its own length
    lengths[0, 1] = lengths[0, 2]
    got = vprior.token_log_probs(ids, tokens, lengths)
    want = hprior.token_log_probs(ids, tokens, lengths)
    assert got.shape == want.shape == tokens.shape and got.dtype == torch.float32
    assert (got - want).abs().max() < TOL, (got - want).abs().max()
    assert got[0, 0].abs().sum() == 0 and got[1, 1, 3:].abs().sum() == 0
    assert torch.equal(got[0, 1], got[0, 2])


@needs_engine
def test_same_seed_same_samples(vprior):
    ids = vprior.encode_prompts(PROMPTS)
    a = vprior.sample(ids, 4, 12, generator=torch.Generator().manual_seed(3))
    b = vprior.sample(ids, 4, 12, generator=torch.Generator().manual_seed(3))
    c = vprior.sample(ids, 4, 12, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.tokens, c.tokens)
    rows = [ids[0]] * 6
    e1 = vprior.continue_prefixes(rows, [[]] * 6, 8, generator=torch.Generator().manual_seed(5))
    e2 = vprior.continue_prefixes(rows, [[]] * 6, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(e1.tokens, e2.tokens)
    assert len({tuple(r) for r in e1.tokens.tolist()}) > 1, "rows of one call must be independent draws"
    post = pst.Posterior(vprior, pst.rewards.Sentiment(), beta=0.5)
    r1 = post.sample(n=4, method="is", max_new_tokens=8, prompts=PROMPTS, seed=7)
    r2 = post.sample(n=4, method="is", max_new_tokens=8, prompts=PROMPTS, seed=7)
    assert r1.texts == r2.texts and torch.equal(r1.log_weights, r2.log_weights)


@needs_engine
def test_per_prompt_seeds_fix_each_prompts_draws_whatever_it_is_batched_with(vprior):
    """Issue 26: with one seed per prompt (posterior.streams) each vLLM request is seeded from its
    prompt's stream, so a prompt's IS and block-SMC samples are the same alone or batched."""
    post = pst.Posterior(vprior, pst.rewards.Sentiment(), beta=0.5)
    for method, opts in (("is", {}), ("smc", {"block_size": 4})):
        both = post.sample(n=4, method=method, max_new_tokens=8, prompts=PROMPTS, seed=[5, 6], **opts)
        alone = post.sample(n=4, method=method, max_new_tokens=8, prompts=PROMPTS[1:], seed=[6], **opts)
        assert both.texts[1] == alone.texts[0], method
        assert torch.allclose(both.log_weights[1], alone.log_weights[0], atol=1e-4), method


@needs_engine
def test_continue_prefixes_respects_budgets_and_eos(vprior, hprior):
    ids = vprior.encode_prompts(PROMPTS)
    # a chat turn, after which the instruct model ends its answer with EOS well within 40 tokens
    chat = VLLMPrior(vprior.llm, chat=True).encode_prompts(["Say hello."])[0]
    assert chat == pst.HFPrior(hprior.model, hprior.tokenizer, chat=True).encode_prompts(["Say hello."])[0]
    budgets = [1, 2, 5, 9, *([40] * 8)]
    rows = [ids[0], ids[1], ids[0], ids[1], *([chat] * 8)]
    prefixes = [[], [28], [28, 564], [], *([[]] * 8)]
    ext = vprior.continue_prefixes(rows, prefixes, budgets, generator=torch.Generator().manual_seed(6))
    eos, pad = set(vprior.eos_token_ids), vprior.eos_token_ids[0]
    assert ext.tokens.shape == (12, int(ext.lengths.max())) and ext.token_log_probs.shape == ext.tokens.shape
    ended = 0
    for b, k in enumerate(budgets):
        L = int(ext.lengths[b])
        seq = ext.tokens[b].tolist()
        assert 1 <= L <= k
        assert all(t not in eos for t in seq[: L - 1])
        assert L == k or seq[L - 1] in eos, f"row {b} stopped at {L} < {k} without EOS"
        ended += seq[L - 1] in eos
        assert all(t == pad for t in seq[L:]) and ext.token_log_probs[b, L:].abs().sum() == 0
        assert torch.isfinite(ext.token_log_probs[b, :L]).all() and (ext.token_log_probs[b, :L] <= 0).all()
    assert ended >= 2, "fewer than 2 rows ended with EOS (seed 6): the EOS path is untested"
    # The 8 copies of one prompt are independent draws, each row with its own tokens' log-probs
    # (as HF scores them).
    copies = ext.tokens[4:12]
    assert len({tuple(row[: int(L)].tolist()) for row, L in zip(copies, ext.lengths[4:12])}) > 1
    hf = hprior.token_log_probs([chat], copies[None], ext.lengths[None, 4:12])[0]
    assert (hf - ext.token_log_probs[4:12]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="max_tokens"):
        vprior.continue_prefixes(rows[:2], prefixes[:2], [3, 0])
    with pytest.raises(ValueError, match="context"):
        vprior.continue_prefixes(rows[:1], [[28] * 8190], 8)


@needs_engine
def test_generate_takes_a_vllm_llm(vprior):
    """pst.generate(llm, None, ...) serves the prior with the engine: the same texts as
    Posterior(VLLMPrior(llm)).sample for the same seed, rows shaped like model.generate's."""
    reward = pst.rewards.Sentiment()
    out = pst.generate(vprior.llm, None, ["The movie was"], reward=reward, beta=0.5, method="smc", n=4,
                       max_new_tokens=8, block_size=4)
    ref = pst.Posterior(VLLMPrior(vprior.llm), reward, beta=0.5).sample(
        n=4, method="smc", max_new_tokens=8, prompts=["The movie was"], seed=0, block_size=4)
    assert out.result.prior["prior"] == "VLLMPrior" and out.result.texts == ref.texts
    assert out.sequences.shape[0] == 4


@needs_engine
def test_hf_and_vllm_priors_are_proposals_for_each_other(vprior, hprior):
    for prior, proposal in [(hprior, vprior), (vprior, hprior)]:
        post = pst.Posterior(prior, pst.rewards.Sentiment(), beta=0.5)
        res = post.sample(n=6, method="is", max_new_tokens=10, prompts=PROMPTS[:1], seed=0, proposal=proposal)
        # same weights, so log pi0 - log q ~ 0 and the weights are softmax(r / beta)
        want = torch.log_softmax(res.rewards.double() / 0.5, -1)
        assert (res.log_weights.double() - want).abs().max() < 10 * TOL, (prior, proposal)
        assert res.info["proposal_support"].startswith("full"), res.info["proposal_support"]
    # a truncated sequence-level proposal: its support cannot be checked token by token, and says so
    post = pst.Posterior(hprior, pst.rewards.Sentiment(), beta=0.5)
    res = post.sample(n=4, method="is", max_new_tokens=6, prompts=PROMPTS[:1], seed=0,
                      proposal=VLLMPrior(vprior.llm, top_k=40))
    assert res.info["proposal_support"].startswith("not checked (VLLMPrior gives sequences only")


@needs_engine
def test_modified_prior_samples_its_own_distribution(vprior):
    hot = VLLMPrior(vprior.llm, temperature=0.7, top_k=20)  # shares the engine; does not own it
    hf = pst.load_default_prior(temperature=0.7, top_k=20)
    ids = hot.encode_prompts(PROMPTS[:1])
    cont = hot.sample(ids, 6, 12, generator=torch.Generator().manual_seed(8))
    want = hf.token_log_probs(ids, cont.tokens, cont.lengths).double().sum(-1)
    assert (want - cont.log_prob.double()).abs().max() < TOL
    assert hot.describe()["modified"] and hot.describe()["backend"] == "vllm"
    with pytest.raises(ValueError, match="unmodified model"):
        hot.log_prob(ids, cont.tokens, cont.lengths)
    hot.close()  # not the owner: the shared engine keeps running
    assert vprior.sample(ids, 1, 2, generator=torch.Generator().manual_seed(0)).tokens.shape[1] >= 1


@needs_engine
def test_stream_draws_what_a_request_with_its_seed_draws(vprior):
    """A stream handle is one seeded request: its tokens and log-probs, read as they come, are those
    of the same request run to the end by a plain call; a call made while the stream runs (as SMC
    scores rewards meanwhile) neither steals nor drops its outputs."""
    ids = vprior.encode_prompts(PROMPTS)
    prefix = ids[1][-2:]
    whole = vprior._generate([ids[0], ids[0] + prefix], [vprior._params(n=1, max_tokens=12, seed=s) for s in (11, 12)])
    stream = vprior.open_stream()
    try:
        h0 = stream.submit(ids[0], [], 12, seed=11)
        h1 = stream.submit(ids[0], prefix, 12, seed=12)
        stream.wait({h0: 3, h1: 1})
        assert len(stream.read(h0)[0]) >= 3
        vprior.continue_prefixes([ids[1]] * 2, [[], []], 5, generator=torch.Generator().manual_seed(0))  # meanwhile
        stream.wait({h0: 12, h1: 12})
        for h, out in zip((h0, h1), whole):
            tokens, lps, ended = stream.read(h)
            c = out.outputs[0]
            assert ended and tokens == list(c.token_ids)
            assert max(abs(a - b) for a, b in zip(lps, _chosen_logprobs(c.logprobs, tokens))) < TOL
        stream.cancel([h0])
        with pytest.raises(KeyError, match="cancelled"):
            stream.read(h0)
    finally:
        stream.close()
    assert vprior._requests == {} and not vprior.llm.llm_engine.has_unfinished_requests()


@needs_engine
def test_smc_over_vllm_streams_and_leaves_no_request_running(vprior):
    """Block SMC over vLLM reads each particle's running request; after the run (and after one that
    fails mid-way) no request of it is left in the engine."""
    post = pst.Posterior(vprior, pst.rewards.Sentiment(), beta=0.1)
    res = post.sample(n=8, method="smc", max_new_tokens=12, prompts=PROMPTS, seed=1, block_size=4, ess_threshold=1.0)
    assert bool(res.info["resampled"][:, 0].all()) and torch.isfinite(res.log_Z).all()  # ess_threshold 1: every boundary with particles running
    assert vprior._requests == {} and not vprior.llm.llm_engine.has_unfinished_requests()
    calls = []

    def failing(texts):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("down")
        return [0.0] * len(texts)

    bad = pst.Posterior(vprior, pst.rewards.Callable(failing, accepts_prefixes=True), beta=0.5)
    with pytest.raises(pst.RewardError, match="down"):
        bad.sample(n=8, method="smc", max_new_tokens=12, prompts=PROMPTS, seed=1, block_size=4, twist="auto")
    assert vprior._requests == {} and not vprior.llm.llm_engine.has_unfinished_requests()


METHODS = {
    "is": {},
    "bon": {"best_of": 2},
    "soft_bon": {"best_of": 2},
    "rejection": {"reward_upper_bound": 1.0, "batch_size": 16},
    "qrs": {"batch_size": 8},
    "mh": {"steps": 2},
    "smc": {"block_size": 4},
}


@needs_engine
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_vllm(vprior, method):
    post = pst.Posterior(vprior, pst.rewards.Sentiment(), beta=0.5)
    res = post.sample(n=4, method=method, max_new_tokens=8, prompts=PROMPTS, seed=0, **METHODS[method])
    assert len(res.texts) == 2 and all(len(t) >= 4 for t in res.texts)
    assert torch.isfinite(res.rewards).all() and torch.isfinite(res.log_weights).all()
    assert torch.allclose(res.log_weights.double().logsumexp(-1), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert (res.lengths >= 1).all() and (res.lengths <= 8).all()
    assert res.prior["backend"] == "vllm"


@needs_engine
def test_cli_sample_backend_vllm():
    # as a user runs it (its own process and engine)
    out = subprocess.run(
        [sys.executable, "-m", "posterior.cli", "sample", "The movie was", "--backend", "vllm", "-n", "4",
         "--max-new-tokens", "6", "--json", "--no-prior", "--method", "smc", "--option", "block_size=3",
         "--engine-option", "max_model_len=1024"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 5 and lines[-1]["method"] == "smc"


ENGINE_EXIT_SCRIPT = textwrap.dedent(
    """
    import json, psutil, torch
    import posterior as pst

    if __name__ == "__main__":
        prior = pst.load_default_prior(backend="vllm")
        prior.sample(prior.encode_prompts(["Hi"]), 2, 4, generator=torch.Generator().manual_seed(0))
        kids = [c.pid for c in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(c.cmdline())]
        print("PIDS" + json.dumps(kids), flush=True)
        # exit without close(): the finaliser must shut the engine down
    """
)


@needs_engine
def test_process_exit_shuts_the_engine_down(tmp_path):
    import time

    script = tmp_path / "exit_without_close.py"
    script.write_text(ENGINE_EXIT_SCRIPT)
    root = os.path.dirname(os.path.dirname(pst.__file__))  # the posterior under test, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    pids = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("PIDS"))[4:])
    assert pids, "the engine started no process?"
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pids), f"engine processes {_alive(pids)} outlived their parent"


# Keep this test last: it closes the module's shared engine.
@needs_engine
def test_close_leaves_no_engine_process(vprior):
    pids = vprior.engine_pids
    assert _alive(pids), "no running engine process to check"
    vprior.close()
    assert not _alive(pids), f"engine processes {_alive(pids)} left after close()"
    vprior.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        vprior.sample([[1]], 1, 1)
