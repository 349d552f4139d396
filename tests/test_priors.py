"""Priors: batched KV-cache sampling, one-pass scoring and an unpadded reference all agree."""


import pytest
import torch

from posterior.priors.base import Prior, process_logits
from posterior.testing import markov_prior, tiny_hf_prior, two_token_prior
import numpy as np
import posterior as pst
from posterior.errors import CheckpointError

PROMPTS = ["hello there, friend", "a", "what is it?"]  # different lengths: left padding


def reference_log_prob(prior, prompt_ids, seq):
    """log pi0 of one continuation from a single unpadded forward pass of the raw model."""
    ids = torch.tensor([prompt_ids + seq])
    with torch.no_grad():
        logits = prior.model(ids).logits[0, len(prompt_ids) - 1 : -1]
    lp = process_logits(logits, prior.temperature, prior.top_k, prior.top_p)
    return lp.gather(1, torch.tensor(seq)[:, None]).sum().item()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("modifiers", [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}])
def test_hf_sampling_scoring_and_unpadded_reference_agree(arch, modifiers):
    prior = tiny_hf_prior(arch, **modifiers)
    ids = prior.encode_prompts(PROMPTS)
    cont = prior.sample(ids, 4, 16, generator=torch.Generator().manual_seed(0))
    assert cont.tokens.shape == (3, 4, int(cont.lengths.max()))  # as wide as the longest, not the budget
    assert (cont.lengths < 16).any() and (cont.lengths == 16).any()  # some end at EOS, some run out
    scored = prior.log_prob(ids, cont.tokens, cont.lengths)
    assert torch.allclose(scored, cont.log_prob, atol=1e-4), (scored - cont.log_prob).abs().max()
    for p in range(3):
        for i in range(0, 4, 2):
            seq = cont.tokens[p, i, : cont.lengths[p, i]].tolist()
            assert reference_log_prob(prior, ids[p], seq) == pytest.approx(cont.log_prob[p, i].item(), abs=1e-4)
    assert prior.describe()["modified"] == bool(modifiers)


def test_hf_texts_drop_eos_and_padding():
    prior = tiny_hf_prior("gpt2")
    ids = prior.encode_prompts(["abc"])
    cont = prior.sample(ids, 6, 30, generator=torch.Generator().manual_seed(1))
    for i in range(6):
        seq = cont.tokens[0, i, : cont.lengths[0, i]].tolist()
        ended = seq[-1] in prior.eos_token_ids
        assert prior.eos_token_ids[0] not in seq[:-1]
        assert cont.texts[0][i] == prior.decode(seq[:-1] if ended else seq)


def test_hf_unconditional_prompt_starts_from_bos():
    prior = tiny_hf_prior("llama")
    assert prior.encode_prompts(None) == [[prior.tokenizer.bos_token_id]]
    cont = prior.sample(prior.encode_prompts(None), 3, 8, generator=torch.Generator().manual_seed(0))
    assert cont.tokens.shape == (1, 3, 8)


def test_hf_select_leaves_the_original_state_intact():
    prior = tiny_hf_prior("llama")
    state = prior.start(prior.encode_prompts(["ab", "hello"]), copies=2)
    picked = prior.select(state, torch.tensor([3, 3, 0]))
    assert torch.equal(picked.logprobs[0], state.logprobs[3]) and torch.equal(picked.logprobs[2], state.logprobs[0])
    tok = torch.tensor([5, 6, 7, 8])
    a = prior.extend(state, tok)  # the original still extends as if select never happened
    fresh = prior.extend(prior.start(prior.encode_prompts(["ab", "hello"]), copies=2), tok)
    assert torch.allclose(a.logprobs, fresh.logprobs, atol=1e-5)
    b = prior.extend(picked, torch.tensor([8, 8, 5]))
    assert torch.allclose(b.logprobs, fresh.logprobs[[3, 3, 0]], atol=1e-5)


def test_compacting_finished_rows_does_not_change_samples():
    """The generic loop drops finished rows from the batch; the same seed through a prior whose
    select is never used for compaction gives identical tokens."""
    prior = markov_prior(("a", "b", "c", "<eos>"), seed=1)
    g = torch.Generator().manual_seed(3)
    cont = prior.sample([[0], [1, 2]], 50, 12, generator=g)
    scored = Prior.log_prob(prior, [[0], [1, 2]], cont.tokens, cont.lengths)
    assert torch.allclose(scored, cont.log_prob, atol=1e-5)
    assert cont.lengths.float().mean() < 12  # many ended early, so compaction happened


def test_callable_prior_sampling_frequencies():
    prior = two_token_prior((0.5, 0.3, 0.2))
    cont = prior.sample([[]], 20_000, 1, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(cont.tokens[0, :, 0], minlength=3).double() / 20_000
    sd = (torch.tensor([0.5, 0.3, 0.2]) * torch.tensor([0.5, 0.7, 0.8]) / 20_000).sqrt()
    assert ((freq - torch.tensor([0.5, 0.3, 0.2])).abs() < 4 * sd).all()


def test_callable_prior_rejects_unnormalised_next_logprobs():
    from posterior import CallablePrior

    bad = CallablePrior(["x", "<eos>"], lambda ids: torch.zeros(ids.shape[0], 2))
    with pytest.raises(ValueError, match="normalised log-probabilities"):
        bad.sample([[]], 2, 2)
    wrong = CallablePrior(["x", "<eos>"], lambda ids: torch.zeros(ids.shape[0], 3).log_softmax(-1))
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        wrong.start([[]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    lp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = process_logits(lp, 1.0, None, 0.75).exp()
    assert out.tolist()[0] == pytest.approx([0.625, 0.375, 0.0, 0.0])
    out = process_logits(lp, 1.0, 2, None).exp()
    assert out.tolist()[0] == pytest.approx([0.625, 0.375, 0.0, 0.0])
    assert torch.isneginf(process_logits(lp, 1.0, None, 0.5)[0, 1:]).all()


# --------------------------------------------------------------------------------------------------
# Local files only: a hub name fails at once, with no network attempt (issue 25.7)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_hub_name_fails_at_once_without_network(name, network_attempts):
    """Before the fix transformers asked the Hub (huggingface_hub fetches a registry to build its
    headers even with local_files_only=True): 25 s per call where DNS answers slowly."""
    import time

    from posterior.priors.hf import HFPrior
    from posterior.priors.vllm import VLLMPrior

    import transformers  # noqa: F401 - imported before the clock starts: the check is what is timed

    for load in (HFPrior.from_pretrained, VLLMPrior.from_pretrained):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=rf"from '{name}' \(local files only\): no such folder.*never downloads"):
            load(name)
        assert time.perf_counter() - t0 < 0.5  # measured: 0.0002 s
    assert network_attempts == []


def test_gguf_file_missing_from_its_folder_is_named(tmp_path, network_attempts):
    from posterior.priors.hf import HFPrior

    with pytest.raises(ValueError, match=r"no GGUF file 'model.gguf' in that folder"):
        HFPrior.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights.bin' \(local files only\): it is a file, not a model folder"):
        HFPrior.from_pretrained(str(tmp_path / "weights.bin"))
    assert network_attempts == []


def test_local_folder_loads_offline_and_the_switches_are_restored(tmp_path, network_attempts, monkeypatch):
    import os

    from huggingface_hub import constants

    from posterior.offline import offline
    from posterior.priors.hf import HFPrior

    prior = tiny_hf_prior("llama")
    prior.model.save_pretrained(tmp_path)
    prior.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    import transformers

    seen, real = [], transformers.AutoTokenizer.from_pretrained

    def tokenizer(*args, **kwargs):  # what the switches are while transformers loads
        seen.append((constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"), kwargs.get("local_files_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    loaded = HFPrior.from_pretrained(str(tmp_path))
    assert loaded.vocab_size == prior.vocab_size and network_attempts == []
    assert seen == [(True, "1", True)]
    assert constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in os.environ
    with offline(), offline():  # nested: only the outer block restores
        assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening.py (issue 11: numbers never silently wrong, inputs checked at the boundary); each test is named after what broke
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"temperature": 1e-40}, "temperature=1e-40 is too small: 1/temperature overflows float32"),
    ({"top_p": "0.9"}, "top_p must be a number in \\(0, 1\\] or None, got '0.9'"),
    ({"top_k": 2.0}, "top_k must be a positive int or None, got 2.0"),
])
def test_prior_sampling_modifiers_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        pst.CallablePrior(["a", "<eos>"], lambda ids: torch.zeros(ids.shape[0], 2).log_softmax(-1), **kw)
    with pytest.raises(ValueError, match=match):
        tiny_hf_prior("gpt2", **kw)


def test_prior_sampling_modifiers_accept_numpy_scalars():
    prior = tiny_hf_prior("gpt2", temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9))
    assert (prior.temperature, prior.top_k, prior.top_p) == (0.5, 5, 0.9)
    assert type(prior.top_k) is int and type(prior.top_p) is float


@pytest.mark.parametrize("device, match", [("nonsense", "device must be a torch device"),
                                           ("cuda:0", "device 'cuda:0' (is not available|does not exist)")])
def test_bad_device_is_refused_naming_it(device, match):
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"
        match = "does not exist"
    base = tiny_hf_prior("gpt2")
    with pytest.raises(ValueError, match=match):
        pst.HFPrior(base.model, base.tokenizer, device=device)


def test_hf_prior_given_something_that_is_not_a_model_is_refused():
    base = tiny_hf_prior("gpt2")
    with pytest.raises(ValueError, match="model must be a loaded transformers causal LM .*got str"):
        pst.HFPrior("gpt2", base.tokenizer)
    with pytest.raises(ValueError, match="model must be a loaded transformers causal LM"):
        pst.HFPrior(base.tokenizer, base.model)  # swapped
    with pytest.raises(ValueError, match="tokenizer must be a transformers tokenizer, got NoneType"):
        pst.HFPrior(base.model, None)


def test_checkpoint_that_is_not_a_causal_lm_fails_at_load_naming_its_path(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from posterior.testing import char_tokenizer

    path = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    with pytest.raises(ValueError, match=rf"{str(path)!r} is not a transformers causal LM checkpoint"):
        pst.HFPrior.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening2.py (issue 19, hardening round two); each test is named after the failure it pins down
# --------------------------------------------------------------------------------------------------
def test_consistency_one_validator_module_bert_folder_is_not_a_causal_lm(tmp_path):
    """An encoder folder loaded as a cache-less BertLMHeadModel and failed mid-sampling with
    "cannot gather rows of a NoneType cache"."""
    from transformers import BertConfig, BertForMaskedLM

    from posterior.priors.hf import HFPrior

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is not a transformers causal LM checkpoint: 'bert' is a bidirectional encoder"):
        HFPrior.from_pretrained(str(tmp_path))


def test_default_model_cache_prefilled_or_altered_is_refused(tmp_path, monkeypatch):
    """A cache folder pre-filled by someone else was loaded without a check."""
    from posterior.priors import default as D

    monkeypatch.setenv("POSTERIOR_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    # a folder at the cache path with weights and a done.json but no record (an old or foreign cache)
    st = gguf.stat()
    key = D.hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{D.CACHE_FORMAT}".encode()).hexdigest()[:16]
    folder = D.cache_dir() / f"{gguf.stem}-{key}"
    folder.mkdir(parents=True)
    weights = folder / D.WEIGHTS
    weights.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    (folder / "done.json").write_text('{"gguf": "x", "size": 1}')
    with pytest.raises(CheckpointError, match="has no integrity record"):
        D._converted(gguf)  # never reaches the conversion
    # with its record, it verifies; any change to the weights or the GGUF file is refused
    D.write_record(folder, gguf, D.sha256_file(gguf))
    assert D._converted(gguf) == folder
    data = bytearray(weights.read_bytes())
    data[100] ^= 1  # inside the header MiB (the tensor index)
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not match its record: model.safetensors differs"):
        D._converted(gguf)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match=r"model.safetensors has \d+ bytes, \d+ were written"):
        D._converted(gguf)
    with pytest.raises(CheckpointError, match="made from another GGUF file"):
        D.verify_cache(folder, "0" * 64)
