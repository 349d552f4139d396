"""A learned twist: a small trainable head over a frozen HF prior's last hidden states.

The prior's last hidden state h_t (H,) after the prompt and x_1:t is the vector its output
embedding E (V, H) maps to the next-token logits E h_t. The head reads the same vector and gives
psi for every one-token extension at once, through the same frozen embedding rows:

    psi(x_1:t · v) = ẽ_v · (W h̃_t + b) / H + (w · h̃_t) / sqrt(H) + c,        v = 1..V,

with W (H, H) (or low rank, W = A·B), b (H,), w (H,), c trainable, ẽ_v = E[v] / rms(E) frozen and
h̃_t = h_t / rms(h_t). The first term is how the next token moves the value (in the prior's own
token geometry), the second the value of the prefix itself. The normalisations put every factor at
unit scale whatever the model, so one learning rate means about the same change of psi per
optimiser step on a tiny test model and on SmolLM2 (an Adam step of size lr on W moves psi by at
most about lr·H·E|ẽ||h̃|, a few tenths at lr = 1e-3, H = 576). Every parameter starts at 0 (A = 0 for low rank), so an untrained
head is psi = 0: the bootstrap (intermediate targets pi0), and training moves it towards
psi*_t(x_1:t) = beta · log E_pi0[exp(r(X)/beta) | x_1:t] (Zhao, Brekelmans, Makhzani & Grosse 2024,
"Probabilistic inference in language models via twisted SMC", who also use a head on the frozen
model's last layer).

Why a head and not a LoRA copy: the hidden state comes out of the forward pass that gives the
prior's next-token distribution (``DecodeState.hidden``, the ``HIDDEN_STATES`` capability), so the
dense values cost one (B, H)·(H, H) and one (B, H)·(H, V) product per step — as much as the
prior's own output layer, and no second transformer pass or KV cache, which a LoRA copy would
need at every step. No (H, V) matrix is made: V is large (SmolLM2: 49152 × 576).

``next_values`` reads ``x.hidden`` (dense, what the tilted proposal needs); ``values`` and
``prefix_values`` (training) run one teacher-forced pass of the prior (``hidden_states``), and
psi(x_1:t) is the x_t entry of the next values at x_1:t-1, so all three agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from posterior.priors.base import HIDDEN_STATES
from posterior.twists.base import Prefixes, TrainableTwist
from posterior.twists.kinds import TwistKind, register
from posterior.twists.tabular import prior_fingerprint

CONFIG = "twist.json"  # the file every saved twist has (``pst.twists.load`` reads its "kind")
WEIGHTS = "twist.safetensors"
_PROBE_ROWS = 64  # embedding rows stored with a saved head, to refuse loading it on another prior


class HeadTwist(TrainableTwist):
    """psi from a linear head over the frozen prior's last hidden states (module docstring).

    Parameters
    ----------
    prior : HFPrior (any prior with the ``HIDDEN_STATES`` capability and ``model.get_output_embeddings``)
        The frozen pi0 whose hidden states and output embedding the head reads; never changed.
    rank : int or None
        None: W is a full (H, H) matrix. An int r: W = A·B with A (H, r) = 0 and B (r, H) drawn
        from N(0, 1/H) with ``seed`` (so the gradient of A is not 0 at the start).
    seed : int
        Seed of B (low rank only); the head's values at the start are 0 whatever the seed.
    max_new_tokens : int or None
        The horizon the twist is trained for (psi* depends on it); ``fit`` refuses another one
        when it is set. None: not fixed.
    """

    name = "head"
    kind = "head"
    dense = True
    needs_hidden = True

    def __init__(self, prior, *, rank: int | None = None, seed: int = 0, max_new_tokens: int | None = None):
        from posterior.validate import is_int

        if not (hasattr(prior, "has") and prior.has(HIDDEN_STATES)):
            raise ValueError(f"a head twist needs a prior with hidden states (HFPrior), got {type(prior).__name__}")
        if rank is not None and (not is_int(rank) or int(rank) < 1):
            raise ValueError(f"rank must be a positive int or None, got {rank!r}")
        if max_new_tokens is not None and (not is_int(max_new_tokens) or int(max_new_tokens) < 1):
            raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
        self.prior = prior
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        emb = prior.model.get_output_embeddings().weight  # (V', H), possibly padded beyond the vocabulary
        V, H = prior.vocab_size, int(emb.shape[1])
        self.vocab_size, self.hidden_size = V, H
        self.rank = None if rank is None else int(rank)
        self.seed = int(seed)
        dev = prior.device
        p = {}
        if self.rank is None:
            p["W"] = torch.zeros(H, H, device=dev)
        else:
            g = torch.Generator().manual_seed(self.seed)
            p["A"] = torch.zeros(H, self.rank, device=dev)
            p["B"] = (torch.randn(self.rank, H, generator=g) / H**0.5).to(dev)
        p["b"] = torch.zeros(H, device=dev)
        p["w"] = torch.zeros(H, device=dev)
        p["c"] = torch.zeros((), device=dev)
        self.params = {k: torch.nn.Parameter(v) for k, v in p.items()}
        # ẽ_v = e_v · _e_scale: the embedding at unit RMS (a constant of the frozen prior)
        self._e_scale = float(self._embedding().pow(2).mean().rsqrt())

    # --- the head ----------------------------------------------------------------------------
    def _embedding(self) -> torch.Tensor:
        """(V, H) float32 frozen output-embedding rows (a view when the model is float32)."""
        return self.prior.model.get_output_embeddings().weight.detach()[: self.vocab_size].float()

    def _direction(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) normalised hidden states -> (..., H): (W h̃ + b) · rms(E)^-1 / H, so that its dot
        product with a raw embedding row e_v is the first term of psi."""
        p = self.params
        u = h @ p["W"].T if self.rank is None else (h @ p["B"].T) @ p["A"].T
        return (u + p["b"]) * (self._e_scale / self.hidden_size)

    def _offset(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) normalised hidden states -> (...): w · h̃ / sqrt(H) + c, the value of the prefix itself."""
        return h @ self.params["w"] / self.hidden_size**0.5 + self.params["c"]

    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        """h̃ = h / rms(h) in float32 on the head's device (rows of zeros stay 0)."""
        h = h.to(device=self.params["b"].device, dtype=torch.float32)
        # Hidden states made under inference mode cannot enter autograd; a copy can.
        h = h.clone() if h.is_inference() else h
        return h * h.pow(2).mean(-1, keepdim=True).clamp(min=1e-12).rsqrt()

    def dense_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) hidden states -> (B, V) float32 psi of every next token (keeps the graph)."""
        h = self._hidden(hidden)
        return self._direction(h) @ self._embedding().T + self._offset(h)[:, None]  # (B, V)

    # --- Twist -------------------------------------------------------------------------------
    def next_values(self, x: Prefixes) -> torch.Tensor:
        if x.hidden is None:
            raise ValueError("the head twist reads hidden states: start the prior with hidden=True (x.hidden is None)")
        with torch.no_grad():
            return self.dense_values(x.hidden).double()  # (B, V)

    def values(self, x: Prefixes) -> torch.Tensor:
        """psi(x_1:t) = entry x_t of the next values at x_1:t-1: one teacher-forced pass (B rows)."""
        L = x.lengths.cpu()
        if bool((L < 1).any()):
            raise ValueError(f"values needs prefixes of >= 1 token, got lengths {L.tolist()}")
        B, t = x.tokens.shape
        with torch.no_grad():
            out = self.prefix_values([list(p) for p in x.prompt_ids], x.tokens.cpu().view(B, 1, t), L.view(B, 1))
        return out.view(B, t).gather(1, (L - 1)[:, None]).squeeze(1).double().cpu()  # (B,)

    # --- TrainableTwist ----------------------------------------------------------------------
    def prefix_values(self, prompt_ids: Sequence[Sequence[int]], tokens: torch.Tensor, lengths: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """psi(x_1:t), t = 1..T, of continuations tokens (P, N, T), lengths (P, N) -> (P, N, T)
        float32 (0 at t > lengths), in one teacher-forced pass of the frozen prior; with ``grad``
        the result carries the head's graph (the prior gets none)."""
        hs = self.prior.hidden_states([list(p) for p in prompt_ids], tokens, lengths)  # (P, N, T, H): h_0..h_T-1
        with torch.set_grad_enabled(grad):
            h = self._hidden(hs)
            tok = tokens.to(h.device)
            e = self._embedding()[tok.clamp(max=self.vocab_size - 1)]  # (P, N, T, H): e of x_1..x_T
            psi = (self._direction(h) * e).sum(-1) + self._offset(h)  # (P, N, T)
            valid = torch.arange(tokens.shape[-1], device=h.device) < lengths.to(h.device)[..., None]
            return torch.where(valid, psi, 0.0)

    def prepare(self, accelerator) -> None:
        """Training under accelerate: one process (the head's gradients are not all-reduced)."""
        if accelerator.num_processes > 1:
            raise ValueError(f"a HeadTwist trains in one process; got {accelerator.num_processes} processes")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.params.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.params
        if set(state) != set(own):
            raise ValueError(f"head twist state has keys {sorted(state)}, this head's are {sorted(own)}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"head twist state {k!r} has shape {tuple(v.shape)}, this head's is {tuple(own[k].shape)}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].device))

    # --- save / load -------------------------------------------------------------------------
    def _probe(self) -> torch.Tensor:
        """(<= 64, H) float32 embedding rows at fixed, evenly spaced ids: the prior's fingerprint."""
        idx = torch.linspace(0, self.vocab_size - 1, min(_PROBE_ROWS, self.vocab_size)).round().long()
        return self._embedding()[idx.to(self.params["b"].device)].cpu().clone()

    def config(self) -> dict:
        """What ``twist.json`` records: kind, shapes, rank, and the prior it was trained on."""
        return {"kind": self.kind, "rank": self.rank, "seed": self.seed, "max_new_tokens": self.max_new_tokens,
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "prior": prior_fingerprint(self.prior)}  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """A folder with ``twist.json`` (:meth:`config`) and ``twist.safetensors`` (the head's
        parameters and the prior's embedding probe)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({**{f"param.{k}": v.contiguous() for k, v in self.trainable_state().items()}, "probe": self._probe()}, str(path / WEIGHTS))
        (path / CONFIG).write_text(json.dumps(self.config(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, prior, config: dict | None = None) -> "HeadTwist":
        """The head saved in ``path``, over ``prior``; refuses a prior other than the one it was
        trained on (vocabulary size, hidden size, or output-embedding rows differ). ``config`` is
        ``twist.json`` when the caller has read it already."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise ValueError(f"{str(path)!r} is not a saved head twist (needs {CONFIG} and {WEIGHTS})")
        cfg = json.loads((path / CONFIG).read_text()) if config is None else config
        if cfg.get("kind") != cls.kind:
            raise ValueError(f"{str(path)!r} holds a twist of kind {cfg.get('kind')!r}, not {cls.kind!r}")
        twist = cls(prior, rank=cfg["rank"], seed=cfg["seed"], max_new_tokens=cfg.get("max_new_tokens"))
        if (twist.vocab_size, twist.hidden_size) != (cfg["vocab_size"], cfg["hidden_size"]):
            raise ValueError(
                f"the head twist in {str(path)!r} was trained on a prior with vocab_size={cfg['vocab_size']}, "
                f"hidden_size={cfg['hidden_size']}; this prior has {twist.vocab_size}, {twist.hidden_size}"
            )
        from posterior.errors import CheckpointError
        from posterior.validate import check_finite

        saved = load_file(str(path / WEIGHTS))
        if "probe" not in saved:
            raise CheckpointError(f"head twist folder {path} is damaged: {WEIGHTS} holds no 'probe' (it holds {sorted(saved)[:6]})", path)
        check_finite(saved, "head twist folder", path)  # before the probe: NaN there reads as "another prior"
        probe = twist._probe()
        # float32 vs bfloat16 copies of one model agree to ~1e-2 relative; another model does not
        if not torch.allclose(saved["probe"], probe, rtol=2e-2, atol=2e-2 * float(probe.abs().max())):
            raise ValueError(f"the head twist in {str(path)!r} was trained on another prior (its output embedding differs)")
        twist.load_trainable_state({k[len("param.") :]: v for k, v in saved.items() if k.startswith("param.")})
        return twist

    def __repr__(self) -> str:
        return f"HeadTwist(V={self.vocab_size}, H={self.hidden_size}, rank={self.rank})"


def _build(prior, *, max_new_tokens=None, prompts=None, rank: int | None = None, seed: int = 0) -> HeadTwist:
    return HeadTwist(prior, rank=rank, seed=seed, max_new_tokens=max_new_tokens)  # one head serves every prompt


register(TwistKind(
    "head", lambda prior, max_new_tokens, prompts: prior.has(HIDDEN_STATES), _build, HeadTwist.load,
    requires=f"the {HIDDEN_STATES!r} capability (HFPrior)",
))  # fmt: skip

__all__ = ["HeadTwist"]
