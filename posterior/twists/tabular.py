"""A tabular twist: one trainable value psi(x_1:t) per prefix of a small prior's continuations.

For a prior with a small vocabulary (a ``CallablePrior``) and continuations of at most
T = ``max_new_tokens`` tokens, the table ``values`` (K, S, V) holds, for prompt k and prefix
s = x_1:t (t = 0..T-1, no EOS; rows indexed by :class:`posterior.priors.prefix_index.PrefixIndex`,
as :class:`posterior.train.TabularPolicy`'s logits are),

    values[k, s, v] = psi_{t+1}(x_1:t · v),

so every prefix of length 1..T has exactly one entry, the dense next-token values at x_1:t are the
row ``values[k, s]`` (one lookup), and psi of x_1:t is ``values[k, s(x_1:t-1), x_t]``. A table
represents every function of prefixes, so the optimal twist

    psi*_t(x_1:t) = beta · log E_pi0[ exp(r(X)/beta) | x_1:t ]

is reachable exactly (:meth:`TabularTwist.set_values` writes it from an enumeration). Entries for
ended prefixes (x_t = EOS, or t = T) are never used by SMC (it uses the reward there); they are
trained by nothing and stay at their initial value.

Initialisation is psi = 0 (the twisted targets are then pi0's marginals: the bootstrap filter).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from posterior.priors.base import Prior
from posterior.priors.prefix_index import PrefixIndex
from posterior.twists import CONFIG_FILE
from posterior.twists.base import Prefixes, TrainableTwist

WEIGHTS_FILE = "twist.safetensors"
FORMAT = 1


def prior_fingerprint(prior: Prior) -> dict:
    """What a saved twist records about its prior, to refuse loading it over another one: the
    vocabulary (when the prior gives a JSON-able key) and ``describe()`` (class and sampling
    modifications). A function of a prior's weights cannot be fingerprinted cheaply: it is not."""
    key = prior.vocabulary_key()
    try:
        key = json.loads(json.dumps(key))
    except TypeError:
        key = repr(key)
    return {"vocabulary": key, "describe": json.loads(json.dumps(prior.describe(), default=str))}


class TabularTwist(TrainableTwist):
    """psi as a (K, S, V) float64 table (see the module docstring); build with
    ``pst.twists.learned(callable_prior, max_new_tokens=T, prompts=...)``.

    Parameters
    ----------
    prior : Prior
        pi0: its vocabulary, EOS and prompt encoding index the table (a ``CallablePrior``).
    max_new_tokens : int
        T, the continuation length (EOS counted) the twist is for: psi* depends on the horizon.
    prompts : list of str or None
        The prompts the table covers (None: one unconditional prompt).
    """

    name = "tabular"
    kind = "tabular"
    dense = True

    def __init__(self, prior: Prior, max_new_tokens: int, *, prompts: Sequence[str] | None = None):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"a tabular twist needs max_new_tokens, a positive int; got {max_new_tokens!r}")
        if isinstance(prompts, str):
            raise ValueError(f"prompts must be a list of str or None, got the str {prompts!r}")
        self.prior = prior
        self.max_new_tokens = max_new_tokens
        self.index = PrefixIndex(prior, max_new_tokens, prompts, what="tabular twist",
                                 hint="; build it with pst.twists.learned(prior, max_new_tokens=..., prompts=[...])")  # fmt: skip
        self.prompts = self.index.prompts
        self.values_table = torch.nn.Parameter(torch.zeros(self.index.shape, dtype=torch.float64))  # (K, S, V)

    # --- the Twist interface -----------------------------------------------------------------
    def _rows(self, x: Prefixes, drop_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row (k, s) of each particle's prefix (without its last token when ``drop_last``) and
        whether the prefix has a row (no EOS, shorter than T)."""
        toks, lens = x.tokens.tolist(), x.lengths.tolist()
        B = len(lens)
        k_idx, s_idx = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
        known = torch.zeros(B, dtype=torch.bool)
        for b in range(B):
            k_idx[b] = self.index.prompt_key(x.prompt_ids[b])
            L = lens[b] - 1 if drop_last else lens[b]
            s = self.index.prefix_index.get(tuple(toks[b][:L]))
            if s is not None:
                s_idx[b], known[b] = s, True
        return k_idx, s_idx, known

    def next_values(self, x: Prefixes) -> torch.Tensor:
        """(B, V) float64: psi(x_1:t · v) for every v; rows of ended or T-long prefixes (never
        extended by SMC) are 0."""
        k_idx, s_idx, known = self._rows(x, drop_last=False)
        with torch.no_grad():
            out = self.values_table[k_idx, s_idx].clone()  # (B, V)
        return torch.where(known[:, None], out, torch.zeros((), dtype=out.dtype))

    def values(self, x: Prefixes) -> torch.Tensor:
        """(B,) float64 psi(x_1:t), t = ``x.lengths`` >= 1."""
        if bool((x.lengths < 1).any()):
            raise ValueError(f"values needs prefixes of at least one token, got lengths {x.lengths.tolist()}")
        k_idx, s_idx, known = self._rows(x, drop_last=True)
        last = x.tokens.gather(1, (x.lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
        with torch.no_grad():
            out = self.values_table[k_idx, s_idx, last]  # (B,)
        return torch.where(known, out, torch.zeros((), dtype=out.dtype))

    # --- the trainable capability ------------------------------------------------------------
    def prefix_values(self, prompt_ids, tokens, lengths, *, grad=False):
        """psi(x_1:t) for t = 1..T of continuations: tokens (P, N, T), lengths (P, N) -> (P, N, T)
        float64, 0 at t > lengths; with the graph to the table when ``grad``."""
        k_idx, s_idx, valid = self.index.positions(prompt_ids, tokens, lengths)  # (P, N, T) each
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            psi = self.values_table[k_idx, s_idx].gather(-1, tokens[..., None]).squeeze(-1)  # (P, N, T)
            out = torch.where(valid, psi, torch.zeros((), dtype=psi.dtype))
        return out if grad else out.detach()

    def trainable_parameters(self):
        return [self.values_table]

    def trainable_state(self):
        return {"values": self.values_table.detach().clone()}

    def load_trainable_state(self, state):
        if set(state) != {"values"}:
            raise ValueError(f"a tabular twist's state has the one key 'values', got {sorted(state)}")
        if tuple(state["values"].shape) != tuple(self.values_table.shape):
            raise ValueError(f"twist values of shape {tuple(state['values'].shape)}, the table's is {tuple(self.values_table.shape)}")
        with torch.no_grad():
            self.values_table.copy_(state["values"])

    @property
    def device(self) -> torch.device:
        return self.values_table.device

    def prepare(self, accelerator) -> None:
        if accelerator.num_processes > 1:
            raise ValueError(f"a TabularTwist (an exact toy) trains in one process; got {accelerator.num_processes} processes")

    def config(self) -> dict:
        """What ``pst.twists.load`` needs to rebuild the twist (the weights aside)."""
        return {"kind": self.kind, "format": FORMAT, "max_new_tokens": self.max_new_tokens, "prompts": self.prompts,
                "prior": prior_fingerprint(self.prior)}  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"values": self.values_table.detach().cpu().contiguous()}, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.config(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path, prior: Prior, config: dict) -> TabularTwist:
        from safetensors.torch import load_file

        twist = cls(prior, config["max_new_tokens"], prompts=config["prompts"])
        twist.load_trainable_state(load_file(str(path / WEIGHTS_FILE)))
        return twist

    # --- exact values (toys) -----------------------------------------------------------------
    def set_values(self, fn: Callable[[int, tuple[int, ...]], float]) -> None:
        """Set every entry to ``fn(k, x_1:t)`` (prompt key k, prefix tuple of length 1..T), e.g.
        the optimal twist from an enumeration (:func:`optimal_values`)."""
        K, S, V = self.index.shape
        table = torch.zeros(K, S, V, dtype=torch.float64)
        for k in range(K):
            for s, prefix in enumerate(self.index.prefixes):
                for v in range(V):
                    table[k, s, v] = fn(k, prefix + (v,))
        with torch.no_grad():
            self.values_table.copy_(table)

    def table_dict(self, k: int = 0) -> dict[tuple[int, ...], float]:
        """{x_1:t: psi(x_1:t)} over every entry of prompt k (ended prefixes included)."""
        table = self.values_table.detach()[k]
        return {prefix + (v,): float(table[s, v]) for s, prefix in enumerate(self.index.prefixes) for v in range(table.shape[-1])}

    def __repr__(self) -> str:
        K, S, V = self.index.shape
        return f"TabularTwist(prompts={K}, prefixes={S}, vocab={V}, max_new_tokens={self.max_new_tokens})"


def optimal_values(sequences: Sequence[tuple[int, ...]], log_prior: torch.Tensor, rewards: torch.Tensor, beta: float, eos_token_ids: Sequence[int]) -> dict[tuple[int, ...], float]:
    """psi*(x_1:t) = beta · log E_pi0[exp(r/beta) | x_1:t] for every prefix of an enumerated support.

    From ``posterior.exact``'s sequences, log pi0 and rewards: psi*(x_1:t) = beta · (logsumexp over
    completions x of x_1:t of [log pi0(x) + r(x)/beta] - log pi0(x_1:t)), with pi0(x_1:t) the
    total prior mass of those completions. At an ended sequence psi* = r. Float64.
    """
    joint: dict[tuple[int, ...], list[float]] = {}
    mass: dict[tuple[int, ...], list[float]] = {}
    lj = (log_prior.double() + rewards.double() / beta).tolist()
    lp = log_prior.double().tolist()
    for seq, a, b in zip(sequences, lj, lp):
        for t in range(1, len(seq) + 1):
            joint.setdefault(seq[:t], []).append(a)
            mass.setdefault(seq[:t], []).append(b)
    lse = lambda xs: float(torch.logsumexp(torch.tensor(xs, dtype=torch.float64), 0))  # noqa: E731
    return {p: beta * (lse(joint[p]) - lse(mass[p])) for p in joint}


__all__ = ["TabularTwist", "optimal_values", "prior_fingerprint"]
