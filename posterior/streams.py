"""Per-prompt random streams: a prompt's draws fixed by its own seed, whatever it is batched with.

A ``torch.Generator`` is one stream: when several prompts are sampled in one call, prompt 2's draws
follow prompt 1's, so a prompt's sample depends on what it was batched with. A server that batches
seeded requests needs the opposite: ``Posterior.sample(prompts, seed=[s_1, ..., s_P])`` where prompt
p's draws come only from a stream seeded with s_p. :class:`Streams` is that: one generator per row
of the leading axis of every draw made with it, accepted wherever samplers and priors take a
``generator``.

How it stays per prompt through a run whose row layout changes (particles, compaction, resampling):

- A draw of shape ``(R, ...)`` takes row r's values from entry r (:meth:`Streams.uniform`); the
  kernels call it through ``posterior.kernels``' ``uniform`` (duck typing: kernels do not import
  this module).
- A call over rows of several prompts (a prior decoding P·N particles, an SMC step over the running
  particles) first gives each row a child stream of its own, :meth:`Streams.for_rows`: entry p
  draws one child seed for each of its rows, in row order. How many children p draws is how many
  rows p has in the call, which depends only on p's own run (its running particles), never on the
  other prompts.
- Dropping rows (a decode loop compacting finished rows) takes entries (:meth:`Streams.take`),
  drawing nothing, so rows that stop early consume nothing more from anyone.

So the sequence of values drawn from entry p is a function of p's seed and p's run alone. The
outputs are then identical whatever the batch, up to the backend's numerics: a batched forward
pass can round differently from the same prompt alone (as in vLLM's seeded sampling).

Who supports it: priors with the ``ROW_STREAMS`` capability (every ``StepwisePrior``: HF, llama.cpp,
callable, trained policies; and vLLM, one request per row) and methods registered with
``streams=True`` (is, bon, soft_bon, smc). ``Posterior.sample`` runs any other method or prior once
per prompt with that prompt's own ``torch.Generator`` (the same guarantee, without batching).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_SEED_HIGH = 2**63 - 1  # child seeds are in [0, 2**63 - 1): valid for torch, numpy and vLLM


class Streams:
    """One ``torch.Generator`` per row; row r of every draw made with it comes from entry r.

    All entries live on one device (``device``). Entries are shared, not copied, by :meth:`take`:
    a Streams is a view of generators whose states advance as they are drawn from.
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        gens = tuple(generators)
        for g in gens:
            if not isinstance(g, torch.Generator):
                raise TypeError(f"Streams holds torch.Generator objects, got {type(g).__name__}: {g!r}")
        if len({g.device for g in gens}) > 1:
            raise ValueError(f"Streams' generators must share one device, got {sorted({str(g.device) for g in gens})}")
        self.generators = gens

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], device: torch.device | str = "cpu") -> "Streams":
        """One generator per seed, seeded with it (``torch.Generator.manual_seed``)."""
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def __repr__(self) -> str:
        return f"Streams({len(self)} on {self.device})"

    @property
    def device(self) -> torch.device:
        return self.generators[0].device if self.generators else torch.device("cpu")

    # --- row layouts ----------------------------------------------------------------------------
    def take(self, index) -> "Streams":
        """The entries at ``index`` (ints, a list or a 1-d tensor), shared: nothing is drawn."""
        idx = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        return Streams([self.generators[i] for i in idx])

    def for_rows(self, owner) -> "Streams":
        """Child streams for the rows of one call: row b belongs to entry ``owner[b]``.

        Entry p draws one child seed per row it owns, in row order (one ``torch.randint`` of that
        many values), so p's stream advances by what p has in the call and nothing else.
        """
        owners = owner.tolist() if isinstance(owner, torch.Tensor) else [int(o) for o in owner]
        counts: dict[int, int] = {}
        for o in owners:
            if not 0 <= o < len(self):
                raise IndexError(f"row owner {o} is outside these {len(self)} streams")
            counts[o] = counts.get(o, 0) + 1
        seeds = {o: iter(self._seeds(o, c)) for o, c in sorted(counts.items())}
        return Streams([torch.Generator(device=self.device).manual_seed(next(seeds[o])) for o in owners])

    def repeat(self, n: int) -> "Streams":
        """Children for ``n`` rows per entry, entry-major (the layout of P prompts × n draws)."""
        return self.for_rows([p for p in range(len(self)) for _ in range(n)])

    def _seeds(self, entry: int, count: int) -> list[int]:
        g = self.generators[entry]
        return torch.randint(0, _SEED_HIGH, (count,), generator=g, device=g.device).tolist()

    # --- draws ----------------------------------------------------------------------------------
    def uniform(self, shape, *, dtype=torch.float64, device=None) -> torch.Tensor:
        """U[0, 1) values of ``shape``; row r (of the leading axis) drawn from entry r."""
        shape = tuple(shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"a draw of shape {shape} from {len(self)} streams needs a leading axis of {len(self)}")
        rows = [torch.rand(shape[1:], generator=g, dtype=dtype, device=g.device) for g in self.generators]
        out = torch.stack(rows) if rows else torch.empty(shape, dtype=dtype)
        return out.to(device) if device is not None else out

    def seeds(self) -> list[int]:
        """One seed in [0, 2**63 - 1) per entry, for backends seeded per request (vLLM)."""
        return [self._seeds(r, 1)[0] for r in range(len(self))]


# --- what samplers and priors call: a torch.Generator passes through unchanged -----------------------
def for_rows(generator, owner):
    """``generator.for_rows(owner)`` for :class:`Streams`; a ``torch.Generator`` (or None) as is."""
    return generator.for_rows(owner) if isinstance(generator, Streams) else generator


def take(generator, index):
    """``generator.take(index)`` for :class:`Streams`; a ``torch.Generator`` (or None) as is."""
    return generator.take(index) if isinstance(generator, Streams) else generator


def repeat(generator, n: int):
    """``generator.repeat(n)`` for :class:`Streams`; a ``torch.Generator`` (or None) as is."""
    return generator.repeat(n) if isinstance(generator, Streams) else generator


def categorical(probs: torch.Tensor, generator) -> torch.Tensor:
    """One index per row of ``probs`` (R, K): ``torch.multinomial`` with a generator, inverse CDF
    of one uniform per row with :class:`Streams` (row r from entry r)."""
    if not isinstance(generator, Streams):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    cdf = torch.cumsum(probs.double(), -1)  # (R, K)
    u = generator.uniform((probs.shape[0], 1), device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
