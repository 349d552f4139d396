"""Trainable policies q: priors whose parameters a training loop updates, initialised at pi0.

A policy *is* a :class:`~posterior.priors.Prior` over the same token ids as the prior it was made
from, so every sampler can use it (``post.sample(method="is", proposal=policy)`` measures how close
it is to pi*) and :mod:`posterior.exact` can enumerate it. ``policy_from(prior)`` gives

* for an ``HFPrior``: an :class:`HFPolicy` — a LoRA adapter (peft) over the frozen base weights,
  or, with ``lora_rank=None``, a full trainable copy of the model. LoRA's B matrices start at 0,
  so q = pi0 exactly at initialisation;
* for a ``CallablePrior``: a :class:`TabularPolicy` — one logit vector per (prompt, prefix) of
  length < ``max_new_tokens``, initialised to the prior's log-probabilities. A table represents
  every distribution over the bounded support, so the optimum of each objective can equal pi*.

Besides the prior interface a policy has :class:`Policy`'s training capability: its trainable
parameters, their state (for checkpoints), ``save`` and ``prepare`` (device placement / data
parallelism under ``accelerate``).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import itertools
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from posterior.errors import CheckpointError, first_line
from posterior.priors.base import GRAD, DecodeState, Prior, StepwisePrior, budgets_per_row, decode_rows
from posterior.priors.callable import CallablePrior
from posterior.priors.hf import HFPrior
from posterior.priors.prefix_index import PrefixIndex
from posterior.train.checkpoint import load_file
from posterior.validate import check_finite, check_int, check_optional_int

TABULAR_FILE = "tabular_policy.pt"


class Policy(abc.ABC):
    """The training capability of a policy (mixed into a Prior subclass).

    Ownership: the policy owns its parameters; ``fit`` updates them in place through an optimiser
    over :meth:`trainable_parameters`.
    """

    base: Prior  # pi0, the prior the policy was initialised from
    max_new_tokens: int | None  # longest continuation the policy is defined for (None: any)

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters an optimiser updates (LoRA matrices, all weights, or the logit table)."""

    @abc.abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters by name (a checkpoint's weights)."""

    @abc.abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (as from :meth:`trainable_state`) into the parameters, in place."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trained policy to the folder ``path`` (created); returns it."""

    def prepare(self, accelerator) -> None:
        """Place the policy on ``accelerator.device`` (and set up data parallelism where it applies)."""


def _check_trainable_state(policy: Policy, state: dict) -> None:
    own = {k: v for k, v in policy.trainable_state().items()}
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"trainable state does not match the policy: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"trainable state {k!r} has shape {tuple(v.shape)}, the policy's is {tuple(own[k].shape)}")


# --------------------------------------------------------------------------------------------
# HF policies: LoRA over a frozen base, or a full copy
# --------------------------------------------------------------------------------------------
class HFPolicy(HFPrior, Policy):
    """An ``HFPrior`` over a trainable model: a peft LoRA model sharing the frozen base weights
    of ``base.model``, or a full copy of it. Same tokenizer, chat setting, EOS ids and sampling
    modifications as ``base``, so the two are densities over the same token sequences.

    The policy runs in eval mode (no dropout: sampling and scoring use one distribution). With
    top-k / top-p the policy's truncation follows its own logits.
    """

    def __init__(self, model, base: HFPrior, *, lora: bool, max_new_tokens: int | None = None):
        super().__init__(
            model, base.tokenizer, chat=base.chat, temperature=base.temperature, top_k=base.top_k,
            top_p=base.top_p, eos_token_ids=base.eos_token_ids,
        )  # fmt: skip
        self.base = base
        self.lora = bool(lora)
        self.max_new_tokens = max_new_tokens
        self._train_module = None  # a DistributedDataParallel wrapper under multi-process accelerate

    def check_lengths(self, prompt_ids, max_new_tokens, prompts=None):
        super().check_lengths(prompt_ids, max_new_tokens, prompts)
        _check_policy_length(self, max_new_tokens)

    def describe(self) -> dict:
        return {**super().describe(), "policy": "lora" if self.lora else "full"}

    # --- training capability -------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self):
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state):
        _check_trainable_state(self, state)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                named[k].copy_(v.to(named[k].device))

    def save(self, path):
        """A LoRA policy saves its adapter (peft ``save_pretrained``: adapter_config.json +
        adapter_model.safetensors); a full copy saves the whole model and the tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        if not self.lora:
            self.tokenizer.save_pretrained(path)
        (path / "posterior_policy.json").write_text(json.dumps({
            "kind": "lora" if self.lora else "full", "chat": self.chat, "eos_token_ids": list(self.eos_token_ids),
            "max_new_tokens": self.max_new_tokens,
        }))  # fmt: skip
        return path

    def prepare(self, accelerator):
        self.model.to(accelerator.device)
        if accelerator.num_processes > 1:
            # Gradients are averaged across processes by DDP's hooks, which run only when the
            # forward pass goes through the wrapper; sampling keeps using the unwrapped model.
            self._train_module = accelerator.prepare_model(self.model)

    # --- model calls -----------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, past=None, last_only=True, grad=False, hidden=False):
        if not (grad and self._train_module is not None):
            return super()._forward(input_ids, attention_mask, position_ids, past, last_only, grad, hidden)
        kw = {"logits_to_keep": 1} if (last_only and self._logits_to_keep) else {}
        if hidden:
            kw["output_hidden_states"] = True
        return self._train_module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kw)

    def token_log_probs(self, prompt_ids, tokens, lengths, *, grad=False, max_chunk_elements=1 << 27):
        if grad and self._train_module is not None:
            # DDP reduces each parameter's gradient once per backward: one forward per batch.
            max_chunk_elements = 1 << 62
        return super().token_log_probs(prompt_ids, tokens, lengths, grad=grad, max_chunk_elements=max_chunk_elements)


def _shallow_copy(model):
    """New module objects sharing ``model``'s parameter and buffer tensors: peft can inject its
    adapter layers into the copy while the prior keeps its own, untouched module tree."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _peft_warnings():
    """While peft wraps a model: silence the two warnings it raises about what it does itself.

    GPT-2's Conv1D layers: peft sets fan_in_fan_out itself and says so. And peft (0.21, the newest
    release) reads the model's ``is_gradient_checkpointing`` in ``PeftModel.__init__``, an alias
    transformers 5.2x deprecates with a FutureWarning in favour of ``is_activation_checkpointing``:
    every LoRA policy built or loaded would print it, though nothing posterior passes is
    deprecated. Only these two messages are silenced, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _lora_policy(prior: HFPrior, rank: int, *, alpha: float | None, target_modules, max_new_tokens, seed: int) -> HFPolicy:
    try:
        from peft import LoraConfig, get_peft_model
    except ModuleNotFoundError as e:  # a declared dependency; say how to get it
        raise ModuleNotFoundError("LoRA policies need peft: pip install peft") from e
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=0.0, target_modules=target_modules,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    devices = [prior.device] if prior.device.type == "cuda" else []
    # peft draws the A matrices from the global RNG: seed it here and restore it afterwards, so
    # the policy depends on ``seed`` only (B = 0, so q = pi0 whatever A is).
    with _peft_warnings(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = get_peft_model(_shallow_copy(prior.model), cfg)
    return HFPolicy(model, prior, lora=True, max_new_tokens=max_new_tokens)


def _full_policy(prior: HFPrior, max_new_tokens) -> HFPolicy:
    model = copy.deepcopy(prior.model)
    for p in model.parameters():
        p.requires_grad_(True)
    return HFPolicy(model, prior, lora=False, max_new_tokens=max_new_tokens)


def _check_policy_length(policy, max_new_tokens: int) -> None:
    if policy.max_new_tokens is not None and max_new_tokens > policy.max_new_tokens:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} exceeds the {type(policy).__name__}'s max_new_tokens="
            f"{policy.max_new_tokens} (the longest continuation it is defined for)"
        )


# --------------------------------------------------------------------------------------------
# Tabular policies over small explicit vocabularies
# --------------------------------------------------------------------------------------------
class TabularPolicy(StepwisePrior, Policy):
    """q(x_t | prompt, x_<t) = softmax(logits[prompt, x_<t]): one free logit vector per prompt and
    continuation prefix of length < ``max_new_tokens``.

    Every distribution over the support (continuations ending at EOS or after ``max_new_tokens``
    tokens) factorises this way, so pi* itself is a reachable optimum. Tokens outside the prior's
    support at a prefix (log pi0 = -inf, e.g. from top-k) stay at probability 0.

    Parameters
    ----------
    prior : CallablePrior
        pi0; the table starts at its log-probabilities.
    max_new_tokens : int
        Longest continuation (EOS counted); prefixes up to ``max_new_tokens - 1`` tokens get rows.
    prompts : list of str or None
        The prompts the table covers (None: one unconditional prompt). Others raise.
    """

    def __init__(self, prior: CallablePrior, max_new_tokens: int, *, prompts: Sequence[str] | None = None):
        max_new_tokens = check_int("a tabular policy's max_new_tokens", max_new_tokens, 1)
        self.base = prior
        self.max_new_tokens = max_new_tokens
        self.prompts = None if prompts is None else list(prompts)
        self.index = PrefixIndex(prior, max_new_tokens, self.prompts, what="tabular policy",
                                 hint="; build it with policy_from(prior, max_new_tokens=..., prompts=[...])")  # fmt: skip
        self._prompt_index, self._prefix_index = self.index.prompt_index, self.index.prefix_index
        K, S, V = self.index.shape
        with torch.no_grad():
            init = prior.start(self.index.contexts(), copies=1).logprobs.double().view(K, S, V)  # (K, S, V)
        self.support = torch.isfinite(init)  # (K, S, V) bool: tokens pi0 allows after each prefix
        self.logits = torch.nn.Parameter(init.masked_fill(~self.support, 0.0))  # (K, S, V) float64

    # --- prior interface -------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[str]:
        return super().capabilities | {GRAD}  # a trainable table: token_log_probs(..., grad=True)

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def eos_token_ids(self):
        return self.base.eos_token_ids

    def vocabulary_key(self):
        return self.base.vocabulary_key()

    def encode_prompts(self, prompts):
        return self.base.encode_prompts(prompts)

    def encode_text(self, text):
        return self.base.encode_text(text)

    def decode(self, token_ids):
        return self.base.decode(token_ids)

    def describe(self) -> dict:
        return {**super().describe(), "policy": "tabular", "max_new_tokens": self.max_new_tokens}

    def check_lengths(self, prompt_ids, max_new_tokens, prompts=None):
        super().check_lengths(prompt_ids, max_new_tokens, prompts)
        _check_policy_length(self, max_new_tokens)

    def _prompt_key(self, ids) -> int:
        return self.index.prompt_key(ids)

    def log_table(self) -> torch.Tensor:
        """log q(v | prompt k, prefix s) for every row: (K, S, V), with the graph."""
        return torch.log_softmax(self.logits.masked_fill(~self.support, -torch.inf), dim=-1)

    def _row_logprobs(self, rows: list[tuple[int, tuple[int, ...]]]) -> torch.Tensor:
        """(B, V) float32 next-token log-probs of (prompt key, prefix) rows, no graph. A prefix past
        the table (ended, or max_new_tokens long) gets a point mass on EOS: such rows are only
        extended as padding by the decode loop, never sampled."""
        V = self.vocab_size
        out = torch.full((len(rows), V), -torch.inf)
        out[:, self.eos_token_ids[0]] = 0.0
        known = [(i, k, self._prefix_index.get(p)) for i, (k, p) in enumerate(rows)]
        known = [(i, k, s) for i, k, s in known if s is not None]
        if known:
            idx = torch.tensor(known, dtype=torch.long)
            with torch.no_grad():
                out[idx[:, 0]] = self.log_table()[idx[:, 1], idx[:, 2]].float()
        return out

    def _state(self, rows):
        lengths = torch.tensor([len(p) for _, p in rows], dtype=torch.long)
        return DecodeState(self._row_logprobs(rows), lengths, rows)

    def start(self, prompt_ids, *, copies=1):
        rows = [(self._prompt_key(p), ()) for p in prompt_ids for _ in range(copies)]
        return self._state(rows)

    def extend(self, state, tokens):
        rows = [(k, p + (int(t),)) for (k, p), t in zip(state.cache, tokens.tolist())]
        return DecodeState(self._row_logprobs(rows), state.lengths + 1, rows)

    def select(self, state, index):
        return DecodeState(state.logprobs[index], state.lengths[index], [state.cache[i] for i in index.tolist()])

    def truncate(self, state, prompt_ids, tokens, keep):
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        rows = [(self._prompt_key(p), tuple(r[:k])) for p, r, k in zip(prompt_ids, tokens.tolist(), keep.tolist())]
        return self._state(rows)

    def continue_prefixes(self, prompt_ids, prefixes, max_tokens, *, generator=None):
        # Keep the prompt / continuation split (the table is indexed by both).
        B = len(prompt_ids)
        if len(prefixes) != B:
            raise ValueError(f"continue_prefixes needs one prefix per prompt row, got {len(prefixes)} for {B}")
        budget = budgets_per_row(max_tokens, B)
        state = self._state([(self._prompt_key(p), tuple(int(v) for v in x)) for p, x in zip(prompt_ids, prefixes)])
        return decode_rows(self, state, budget, generator=generator).extension

    def token_log_probs(self, prompt_ids, tokens, lengths, *, grad=False):
        """Gathered from the table: tokens (P, N, T), lengths (P, N) -> (P, N, T) float32."""
        k_idx, s_idx, valid = self.index.positions(prompt_ids, tokens, lengths)  # (P, N, T) each
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            lp = self.log_table()[k_idx, s_idx].gather(-1, tokens[..., None]).squeeze(-1)  # (P, N, T)
            out = torch.where(valid, lp, torch.zeros((), dtype=lp.dtype)).float()
        return out if grad else out.detach()

    # --- training capability -------------------------------------------------------------------
    def trainable_parameters(self):
        return [self.logits]

    def trainable_state(self):
        return {"logits": self.logits.detach().clone()}

    def load_trainable_state(self, state):
        _check_trainable_state(self, state)
        with torch.no_grad():
            self.logits.copy_(state["logits"])

    def prepare(self, accelerator):
        if accelerator.num_processes > 1:
            raise ValueError(
                f"a TabularPolicy (an exact toy) trains in one process; got {accelerator.num_processes} processes"
            )

    def save(self, path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"logits": self.logits.detach().cpu(), "prompts": self.prompts, "max_new_tokens": self.max_new_tokens,
                    "vocab": list(self.base.vocab)}, path / TABULAR_FILE)  # fmt: skip
        return path

    def set_distribution(self, sequences: Sequence[Sequence[int]], log_probs: torch.Tensor, *, prompt: str | None = None) -> None:
        """Set the table so that q(x | prompt) equals the given distribution over whole
        continuations (token tuples, EOS included where present; e.g. an ``ExactPosterior``'s
        ``sequences`` and ``log_posterior``). Conditionals are mass ratios in float64; prefixes the
        distribution never reaches keep their rows, tokens of zero mass get logit -1e4 (exp = 0)."""
        k = self._prompt_key(self.encode_prompts(None if prompt is None else [prompt])[0])
        mass: dict[tuple[int, ...], torch.Tensor] = {}
        probs = torch.as_tensor(log_probs, dtype=torch.float64).exp()
        for seq, pr in zip(sequences, probs):
            seq = tuple(int(v) for v in seq)
            if len(seq) > self.max_new_tokens:
                raise ValueError(f"sequence {seq} is longer than max_new_tokens={self.max_new_tokens}")
            for t in range(len(seq)):
                row = mass.setdefault(seq[:t], torch.zeros(self.vocab_size, dtype=torch.float64))
                row[seq[t]] += pr
        with torch.no_grad():
            for prefix, row in mass.items():
                s = self._prefix_index[prefix]
                total = row.sum()
                if total > 0:
                    self.logits[k, s] = (row / total).log().clamp(min=-1e4).masked_fill(~self.support[k, s], 0.0)


# --------------------------------------------------------------------------------------------
def policy_from(
    prior: Prior,
    *,
    lora_rank: int | None = None,
    max_new_tokens: int | None = None,
    prompts: Sequence[str] | None = None,
    lora_alpha: float | None = None,
    target_modules: str | list[str] = "all-linear",
    seed: int = 0,
) -> Prior:
    """A trainable policy q initialised at pi0 = ``prior`` (q = pi0 exactly).

    Parameters
    ----------
    prior : HFPrior or CallablePrior
        pi0. Serving-engine priors (vLLM) have no gradients: build the policy from an ``HFPrior``
        of the same weights.
    lora_rank : int or None
        HF priors: rank of a LoRA adapter over the frozen base weights (shared with ``prior``,
        whose parameters peft marks ``requires_grad=False``); None: a full trainable copy.
    max_new_tokens : int or None
        Required for a ``CallablePrior`` (the table's depth); for HF priors an optional bound.
    prompts : list of str or None
        Tabular policies only: the prompts the table covers (None: one unconditional prompt).
    lora_alpha : float or None
        LoRA scaling numerator (default ``2 * lora_rank``).
    target_modules : str or list of str
        peft's LoRA target modules (default every linear layer but the output head).
    seed : int
        Seeds the LoRA A matrices' random initialisation (the global RNG is left as it was).

    Returns
    -------
    HFPolicy or TabularPolicy
        A :class:`~posterior.priors.Prior` and a :class:`Policy`.
    """
    if isinstance(prior, Policy):
        raise ValueError(f"prior is already a trainable policy ({type(prior).__name__}); pass the original prior")
    max_new_tokens = check_optional_int("max_new_tokens", max_new_tokens, 1)
    # By capability: a prior with gradients (a transformers model) gets a LoRA / full copy; the
    # tabular policy is built from a CallablePrior's explicit vocabulary (a construction, not a capability).
    if prior.has(GRAD):
        if prompts is not None:
            raise ValueError("prompts= applies to tabular policies (CallablePrior) only; an HF policy covers every prompt")
        if lora_rank is None:
            return _full_policy(prior, max_new_tokens)
        lora_rank = check_int("lora_rank", lora_rank, 1)
        return _lora_policy(prior, lora_rank, alpha=lora_alpha, target_modules=target_modules,
                            max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    if isinstance(prior, CallablePrior):
        if lora_rank is not None:
            raise ValueError(f"lora_rank={lora_rank!r} applies to HF priors; a CallablePrior gets a tabular policy")
        if max_new_tokens is None:
            raise ValueError("a tabular policy (CallablePrior) needs max_new_tokens, the depth of its table")
        return TabularPolicy(prior, max_new_tokens, prompts=prompts)
    raise ValueError(
        f"policy_from supports HFPrior and CallablePrior, got {type(prior).__name__}: a serving-engine prior "
        "(vLLM) has no gradients; build the policy from an HFPrior of the same weights "
        "(e.g. pst.load_default_prior()) and sample the trained adapter wherever you like"
    )


def load_policy(prior: Prior, path: str | os.PathLike) -> Prior:
    """A policy saved by ``policy.save(path)``, over ``prior`` (the same pi0 it was trained from)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"policy folder {path} does not exist", path)
    if not path.is_dir():
        raise CheckpointError(f"policy folder {path} is a file, not a folder saved by policy.save", path)
    if (path / TABULAR_FILE).is_file():
        if not isinstance(prior, CallablePrior):
            raise ValueError(f"{path} holds a tabular policy; it needs a CallablePrior, got {type(prior).__name__}")
        saved = load_file(path / TABULAR_FILE, "tabular policy")
        if not (isinstance(saved, dict) and {"vocab", "logits", "prompts", "max_new_tokens"} <= set(saved)):
            raise CheckpointError(f"tabular policy {path / TABULAR_FILE} is not a saved TabularPolicy", path / TABULAR_FILE)
        if saved["vocab"] != list(prior.vocab):
            raise ValueError(f"{path}: the tabular policy's vocabulary {saved['vocab']} differs from the prior's {prior.vocab}")
        check_finite({"logits": saved["logits"]}, "tabular policy folder", path, allow_neg_inf=True)  # -inf: never drawn
        try:
            policy = TabularPolicy(prior, saved["max_new_tokens"], prompts=saved["prompts"])
            policy.load_trainable_state({"logits": saved["logits"]})
        except (TypeError, AttributeError) as e:  # fields of the wrong type: a file damaged or not ours
            raise CheckpointError(f"tabular policy folder {path} is damaged ({type(e).__name__}: {first_line(e)})", path) from None
        return policy
    lora, full = (path / "adapter_config.json").is_file(), (path / "config.json").is_file()
    if not (lora or full):
        what = "is empty" if not any(path.iterdir()) else "holds no saved policy"
        raise CheckpointError(f"policy folder {path} {what} (no {TABULAR_FILE}, adapter_config.json or config.json)", path)
    if not prior.has(GRAD):
        raise ValueError(f"{path} holds an HF policy; it needs an HFPrior (a prior with gradients), got {type(prior).__name__}")
    meta_file = path / "posterior_policy.json"
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file} is not readable JSON ({e})", meta_file) from None
    from safetensors import SafetensorError

    try:
        if lora:
            from peft import PeftModel

            with _peft_warnings():
                model = PeftModel.from_pretrained(_shallow_copy(prior.model), str(path), is_trainable=True)
            policy = HFPolicy(model, prior, lora=True, max_new_tokens=meta.get("max_new_tokens"))
            check_finite(policy.trainable_state(), "policy folder", path)  # the adapter's weights
            return policy
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=prior.model.dtype)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError) as e:  # torn weights, foreign configs
        raise CheckpointError(f"policy folder {path} cannot be loaded ({type(e).__name__}: {first_line(e)})", path) from None
    check_finite(dict(model.named_parameters()), "policy folder", path)
    return HFPolicy(model.to(prior.device), prior, lora=False, max_new_tokens=meta.get("max_new_tokens"))


__all__ = ["HFPolicy", "Policy", "TabularPolicy", "load_policy", "policy_from"]
