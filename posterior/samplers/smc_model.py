"""The model side of SMC over tokens: proposals and potentials per step, for the engine
(``posterior.samplers.engine``) to weight, resample and drive.

Targets. After t tokens the intermediate target is gamma_t(x_1:t) = pi0(x_1:t) exp(g_t(x_1:t)/beta)
with g = psi_t (a :class:`~posterior.twists.base.Twist`) while the particle runs and g = r(x) once
it has ended (EOS, or max_new_tokens tokens), so the last target is exactly the unnormalised pi*
whatever the twist (Naesseth, Lindsten & Schön 2019; Zhao et al. 2024, "Probabilistic inference in
language models via twisted SMC"). Without a twist (psi = 0) the finite part of the reward is
deferred: an ended particle's potential is 0 while others still run (-inf at once if r(x) = -inf),
and the engine's ``finish`` reweights it by exp(r(x)/beta) with the r stored when it ended (the
reward is called once per ended particle). Deferring keeps particles that end early from
crowding out running ones at resampling and makes a constant reward exact.

Two models:

* :class:`TokenModel` (priors with ``NEXT_TOKEN``: HF, callable, tabular policies): one token per
  step from the decode state (KV cache); the twist is evaluated every ``block_size`` tokens
  (carried in between), resampling is checked there. Proposals, with
  Delta(v) = g(x_1:t-1 · v) - psi_t-1 and any q(v) ∝ pi0(v) exp(phi(v)/beta), L = sum_v pi0 e^{phi/beta}:

      w_t(v) = pi0(v) exp(Delta(v)/beta) / q(v) = L · exp((Delta(v) - phi(v)) / beta),

  so E_q[w_t] = sum_v pi0(v) exp(Delta(v)/beta) for ANY phi finite where pi0 > 0 (-inf only where
  Delta is -inf): the weights stay exact whatever phi.
  - "bootstrap": phi = 0 (q = pi0), log w = Delta/beta. A dense twist's psi of the sampled token is
    read from its ``next_values`` row (one call per boundary step, no per-text calls).
  - "tilted", non-dense twist: phi = Delta on the ``lookahead`` most likely tokens C (one batched
    call of k texts per particle), 0 outside C (Delta of a sampled non-candidate is evaluated
    after sampling). Lew et al. 2023 propose with such one-step look-ahead potentials.
  - "tilted", dense twist: phi(v) = psi(x·v) - psi_t-1 for every v from ONE ``next_values`` call;
    a sampled token that does not end gets Delta = phi, i.e. log w = log L; one that ends gets
    its exact Delta from the reward. With psi* = beta log E_pi0[exp(r/beta) | x_1:t] (whose value
    on an ended sequence is r) every weight is Z: zero variance.
* :class:`BlockModel` (any prior: ``continue_prefixes`` only, e.g. a serving engine): every running
  particle is extended by up to ``block_size`` tokens from pi0 (bootstrap on the grid t = 0, B,
  2B, ...), log w = (g(x_1:t+B) - psi_t)/beta. With ``decode_ahead`` it draws each particle's
  continuation ahead and hands it out block by block (below): on a prior that streams
  (``STREAM``, a serving engine: :mod:`posterior.priors.stream`) each continuation is one request
  that keeps running in the engine, read block by block as it is decoded and cancelled when
  resampling drops its particle; on other priors, ahead by an adaptive number of blocks per call.

Decode-ahead is exactly block SMC. Let block SMC extend particle i at boundary j by a fresh
draw X^i_j ~ pi0(. | x^i_1:jB). By the chain rule, drawing X^i = (X^i_j, X^i_j+1, ...) at once from
pi0(. | x^i_1:jB) and revealing it block by block gives each block the same conditional law. The
weight of particle i at boundary j' and every resampling decision up to j' are functions of the
prefixes x_1:j'B (and of the resampler's own uniforms), so the not yet revealed part of X^i is
independent of them given x^i_1:j'B. At the first boundary where the rule fires, ancestor a with
c_a >= 1 offspring needs c_a independent draws from pi0(. | x^a_1:j'B): the unrevealed part of
X^a is one (it is a pi0 draw given that prefix, independent of the decision that chose a), and
only the other c_a - 1 copies are re-submitted. Hence the joint law of tokens, weights, ancestors
and log Ẑ equals block SMC's, for every block size, twist and ess_threshold; only the order in
which random numbers are drawn differs (seeded outputs differ from decode_ahead=False). Cost: every
particle is decoded once, plus one continuation per duplicate per resampling (its discarded future
and its re-submission); a serving engine batches each call. A stream is the limit of an infinite
horizon revealed lazily: X^i is one request, drawn to the end unless cancelled, and how much of it
the engine has decoded when SMC reads it is timing, which changes no token (the draw is fixed by
its seed and prefix); a cancelled request is the discarded future of a particle with no offspring.

Contract check (issue 19): a twist may be -inf only on prefixes none of whose completions has a
finite reward. Where a running particle dies of the twist, one completion of its prefix is drawn
from the prior (a generator of its own, so sampled outputs are unchanged) and scored: a finite
reward raises ``ValueError`` naming the twist and the prefix (``check_twist=False`` skips it).

Adding a proposal: a function like :meth:`TokenModel._bootstrap` returning a :class:`_Drawn`
(tokens, log q, potentials, increments) for the running rows, registered in ``PROPOSALS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from posterior import streams
from posterior.kernels import tilted_sample
from posterior.priors.base import DecodeState, HIDDEN_STATES, STREAM, Prior, request_seeds
from posterior.priors.stream import Stream
from posterior.rewards.base import Reward
from posterior.samplers.engine import EngineConfig, Forced, Move, Particles, SMCModel, SMCState
from posterior.samplers.options import PROPOSALS
from posterior.twists.base import Prefixes, Twist

CHECK_ROLLOUTS = 32  # at most this many twist-killed particles are checked per step
CHECK_SEED = 0x5EED  # the contract check's own generator: sampled outputs do not depend on it


def tilted_log_weight(log_norm: torch.Tensor, delta: torch.Tensor, phi: torch.Tensor, beta: float) -> torch.Tensor:
    """log w = log pi0(v) + Delta(v)/beta - log q(v) = log L + (Delta(v) - phi(v)) / beta.

    Parameters
    ----------
    log_norm : Tensor (B,)
        log L, the normaliser of q (-inf: the row has no proposal mass, the particle dies).
    delta : Tensor (B,)
        Delta(v) = g(x_1:t) - psi_{t-1} of the sampled token, computed exactly (-inf allowed).
    phi : Tensor (B,)
        The potential q used for v: Delta(v) if v was a candidate, else 0 (finite, as q(v) > 0).
    """
    return torch.where(torch.isneginf(log_norm), -math.inf, log_norm + (delta - phi) / beta)


class _Drawn(NamedTuple):
    tokens: torch.Tensor  # (m,) int64
    log_q: torch.Tensor  # (m,) float64
    potential: torch.Tensor  # (m,) float64 g of the new prefix
    log_increment: torch.Tensor  # (m,) float64
    reward: torch.Tensor  # (m,) float64 r where ended and scored, NaN elsewhere


@dataclass
class Potentials:
    """The potentials g of new prefixes: the twist on running ones, the reward on ended ones.

    The reward is called once per (prefix, ended) text asked for; with a twist that is the
    posterior's own reward read on prefixes (``from_reward``), both are one batched call."""

    prior: Prior
    reward: Reward
    twist: Twist | None
    cfg: EngineConfig  # beta, N and the horizon (held there only)
    prompt_rows: list[list[int]]  # P·N: each flat particle's prompt ids
    check_twist: bool = True

    @property
    def beta(self) -> float:
        return self.cfg.beta

    @property
    def num_particles(self) -> int:
        return self.cfg.num_particles

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens

    @property
    def defers_reward(self) -> bool:
        return self.twist is None

    def texts(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        eos = set(self.prior.eos_token_ids)
        return [self.prior.decode([v for v in s if v not in eos]) for s in seqs]

    def prefixes(self, pid: torch.Tensor, seqs: Sequence[Sequence[int]], hidden=None) -> Prefixes:
        """Prefixes of flat particles ``pid`` with token lists ``seqs`` (for a twist)."""
        pad = self.prior.eos_token_ids[0]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        width = int(lengths.max()) if len(seqs) else 0
        tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
        for b, s in enumerate(seqs):
            tokens[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        ids = pid.tolist()
        return Prefixes(
            prompt_ids=[self.prompt_rows[i] for i in ids], tokens=tokens, lengths=lengths,
            prompt_index=pid // self.num_particles, decode=self.prior.decode,
            eos_token_ids=tuple(self.prior.eos_token_ids), hidden=hidden,
        )  # fmt: skip

    def twist_values(self, pid: torch.Tensor, seqs, texts: list[str] | None = None) -> torch.Tensor:
        values_of_texts = getattr(self.twist, "values_of_texts", None)
        if values_of_texts is not None:
            out = values_of_texts(self.texts(seqs) if texts is None else texts)
        else:
            out = self.twist.values(self.prefixes(pid, seqs))
        return check_values(self.twist, out, (len(seqs),))

    def __call__(self, pid: torch.Tensor, seqs: list[list[int]], ended: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g and r (NaN where not ended) of new prefixes ``seqs`` of flat particles ``pid``; (n,) float64 each."""
        n = len(seqs)
        g = torch.zeros(n, dtype=torch.float64)
        r = torch.full((n,), math.nan, dtype=torch.float64)
        if not n:
            return g, r
        texts = self.texts(seqs)
        end = ended.nonzero().squeeze(1).tolist()
        run = (~ended).nonzero().squeeze(1).tolist()
        if self.twist is None:
            if end:
                r[end] = self.reward([texts[i] for i in end])
                g[end] = torch.zeros(len(end), dtype=torch.float64).masked_fill(torch.isneginf(r[end]), -math.inf)
            return g, r
        if getattr(self.twist, "reward", None) is self.reward:  # one batched call for both
            vals = self.reward(texts)
            r[end] = vals[end]
            return vals, r
        if end:
            r[end] = self.reward([texts[i] for i in end])
            g[end] = r[end]
        if run:
            g[run] = self.twist_values(pid[run], [seqs[i] for i in run], [texts[i] for i in run])
        return g, r

    def check_kills(self, pid: torch.Tensor, seqs: list[list[int]]) -> None:
        """Roll one completion of each twist-killed prefix out of the prior; raise if its reward is finite."""
        if not self.check_twist or not len(seqs) or self.twist is None:
            return
        pid, seqs = pid[:CHECK_ROLLOUTS], seqs[:CHECK_ROLLOUTS]
        gen = torch.Generator(device=self.prior.device).manual_seed(CHECK_SEED)
        budget = [self.max_new_tokens - len(s) for s in seqs]
        ext = self.prior.continue_prefixes([self.prompt_rows[i] for i in pid.tolist()], seqs, budget, generator=gen)
        full = [list(s) + row[:L] for s, row, L in zip(seqs, ext.tokens.cpu().tolist(), ext.lengths.cpu().tolist())]
        texts = self.texts(full)
        r = self.reward(texts)
        bad = torch.isfinite(r).nonzero().squeeze(1).tolist()
        if bad:
            b = bad[0]
            raise ValueError(
                f"twist {self.twist.name!r} is -inf on the prefix {self.texts([seqs[b]])[0]!r} (prompt #{int(pid[b]) // self.num_particles}), "
                f"but its completion {texts[b]!r} has reward {r[b].item():.6g}: a twist may be -inf only where no completion "
                "has a finite reward (else SMC's samples and log Z are silently wrong); make it finite there"
            )


def check_values(twist: Twist, out, shape: tuple[int, ...]) -> torch.Tensor:
    """A twist's output as float64 of ``shape``; NaN and +inf are errors naming the twist."""
    out = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float64)
    if tuple(out.shape) != shape:
        raise ValueError(f"twist {twist.name!r} returned shape {tuple(out.shape)}, expected {shape}")
    bad = torch.isnan(out) | torch.isposinf(out)
    if bool(bad.any()):
        raise ValueError(f"twist {twist.name!r} returned {out[bad][0].item()} (at {bad.nonzero()[0].tolist()}); values must be finite or -inf")
    return out


# --------------------------------------------------------------------------------------------------
# Token steps over decode states
# --------------------------------------------------------------------------------------------------
class TokenCarry(NamedTuple):
    """The decode rows (KV cache) of the particles still decoded: row r is flat particle
    ``row_particle[r]``; rows of ended particles are dropped at the next reorder."""

    decode: DecodeState
    row_particle: torch.Tensor  # (b,) int64
    t: int  # tokens the rows have consumed


@dataclass
class TokenModel(SMCModel):
    """One token per step on a prior with next-token distributions (see the module docstring)."""

    pot: Potentials
    proposal: str = "bootstrap"
    lookahead: int = 8
    block_size: int = 1

    def __post_init__(self):
        tw = self.pot.twist
        if tw is not None and tw.needs_hidden:
            if not tw.dense:
                raise ValueError(
                    f"twist {tw.name!r} reads hidden states but is not dense: on a step-wise prior a twist of hidden "
                    "states gives next_values (psi of every next token from the state before it)"
                )
            if not self.pot.prior.has(HIDDEN_STATES):
                raise ValueError(
                    f"twist {tw.name!r} reads the prior's hidden states; {type(self.pot.prior).__name__} does not give "
                    "them (no HIDDEN_STATES capability)"
                )

    @property
    def prior(self) -> Prior:
        return self.pot.prior

    @property
    def config(self) -> EngineConfig:
        return self.pot.cfg

    def init(self, prompt_ids, num_particles):
        P = len(prompt_ids)
        tw = self.pot.twist
        if tw is not None and tw.needs_hidden:
            decode = self.prior.start(prompt_ids, copies=num_particles, hidden=True)
        else:
            decode = self.prior.start(prompt_ids, copies=num_particles)
        return TokenCarry(decode, torch.arange(P * num_particles), 0)

    def step_tokens(self, t: int) -> int:
        return 1

    def propose(self, state: SMCState, rows: torch.Tensor, *, forced: Forced | None, generator) -> Move:
        carry: TokenCarry = state.carry
        p, t = state.particles, state.t
        P, N = p.lengths.shape
        running = state.running.reshape(-1)
        dec = running[carry.row_particle].nonzero().squeeze(1)  # decode rows of the running particles (m,)
        logprobs = carry.decode.logprobs  # (b, V)
        dev = logprobs.device
        if dec.numel() != logprobs.shape[0]:
            logprobs = logprobs.index_select(0, dec.to(dev))  # (m, V)
        prefixes = p.tokens.reshape(P * N, -1)[rows, :t].tolist()
        psi_prev = p.psi.reshape(-1)[rows]  # (m,)
        boundary = (t + 1) % self.block_size == 0
        last = t + 1 == self.pot.max_new_tokens
        tw = self.pot.twist
        dense = None
        if tw is not None and tw.dense and boundary:
            hidden = None
            if tw.needs_hidden:
                hidden = carry.decode.hidden if dec.numel() == carry.decode.hidden.shape[0] else carry.decode.hidden.index_select(0, dec.to(dev))
            x = self.pot.prefixes(rows, prefixes, hidden)
            dense = check_values(tw, tw.next_values(x), tuple(logprobs.shape))  # (m, V) psi(x·v)
        if self.proposal == "tilted" and dense is not None:
            drawn = self._tilted_dense(rows, logprobs, prefixes, psi_prev, dense, last, forced, generator)
        elif self.proposal == "tilted":
            drawn = self._tilted(rows, logprobs, prefixes, psi_prev, boundary, last, forced, generator)
        else:
            drawn = self._bootstrap(rows, logprobs, prefixes, psi_prev, boundary, last, dense, forced, generator)
        tok = drawn.tokens
        eos = torch.tensor(self.prior.eos_token_ids)
        ended = torch.isin(tok, eos) | last  # (m,)
        tok_lp = logprobs.gather(1, tok.to(dev)[:, None]).squeeze(1).double().cpu()  # (m,)
        killed = ~ended & torch.isneginf(drawn.potential) & ~torch.isneginf(psi_prev)
        if bool(killed.any()):
            k = killed.nonzero().squeeze(1)
            self.pot.check_kills(rows[k], [prefixes[i] + [int(tok[i])] for i in k.tolist()])
        return Move(
            tokens=tok[:, None], lengths=torch.ones_like(tok), log_prior=tok_lp, log_q=drawn.log_q,
            potential=drawn.potential, log_increment=drawn.log_increment, ended=ended, reward=drawn.reward,
            boundary=boundary, carry=carry._replace(t=t),
        )  # fmt: skip

    def advance(self, carry: TokenCarry, particles: Particles, src, running, resampled) -> TokenCarry:
        """One reorder when resampling changes the rows or when ended rows are half the batch, then
        feed every kept row its token (``carry.decode`` is consumed)."""
        P, N = particles.lengths.shape
        keep = running.reshape(-1).nonzero().squeeze(1)  # (m',) particles decoded next
        decode, row_particle = carry.decode, carry.row_particle
        if not keep.numel():
            return TokenCarry(decode, row_particle, carry.t + 1)
        if bool(resampled.any()) or 2 * keep.numel() <= row_particle.numel():
            row_of = torch.full((P * N,), -1, dtype=torch.long)
            row_of[row_particle] = torch.arange(row_particle.numel())
            decode = self.prior.reorder(decode, row_of[src[keep]].to(self.prior.device))
            row_particle = keep
        feed = particles.tokens.reshape(P * N, -1)[row_particle, carry.t]  # ended rows left in the batch get their (EOS) token
        return TokenCarry(self.prior.extend(decode, feed.to(self.prior.device)), row_particle, carry.t + 1)

    # --- proposals --------------------------------------------------------------------------------
    def _score(self, rows, prefixes, nxt, ended, need, fallback) -> tuple[torch.Tensor, torch.Tensor]:
        """g (fallback where not ``need``) and r (NaN where not ended and needed) of (prefix, next token) pairs."""
        g = fallback.clone()
        r = torch.full_like(fallback, math.nan)
        idx = need.nonzero().squeeze(1)
        if idx.numel():
            ii = idx.tolist()
            g[idx], r[idx] = self.pot(rows[idx], [prefixes[i] + [nxt[i]] for i in ii], ended[idx])
        return g, r

    def _check_forbidden(self, rows, prefixes, tokens, mask, row_of=None) -> None:
        """Tokens with pi0 > 0 that the twist makes -inf (so q never proposes them): roll their
        prefixes out like killed particles (``Potentials.check_kills``)."""
        if not bool(mask.any()) or not self.pot.check_twist:
            return
        r, j = mask.nonzero(as_tuple=True)
        r, j = r[:CHECK_ROLLOUTS], j[:CHECK_ROLLOUTS]
        src = r if row_of is None else row_of[r]
        self.pot.check_kills(rows[src], [prefixes[int(a)] + [int(tokens[b, c])] for a, b, c in zip(src, r, j)])

    def _force(self, tok: torch.Tensor, forced: Forced | None) -> torch.Tensor:
        if forced is None:
            return tok
        return torch.where(forced.rows, forced.tokens[:, 0], tok)

    def _bootstrap(self, rows, logprobs, prefixes, psi_prev, boundary, last, dense, forced, generator) -> _Drawn:
        """x_t ~ pi0(. | x_1:t-1); log w = (g(x_1:t) - psi_{t-1}) / beta."""
        eos = torch.tensor(self.prior.eos_token_ids)
        tok = self._force(tilted_sample(logprobs, generator=generator).tokens.cpu(), forced)  # (m,) q = pi0
        ended = torch.isin(tok, eos) | last  # (m,)
        twist_now = boundary and self.pot.twist is not None
        if dense is not None:  # psi of the sampled token from the dense row; the reward where it ended
            fallback = torch.where(ended, psi_prev, dense.gather(1, tok[:, None]).squeeze(1))
            g, r = self._score(rows, prefixes, tok.tolist(), ended, ended, fallback)
        else:
            g, r = self._score(rows, prefixes, tok.tolist(), ended, ended | twist_now, psi_prev)
        log_q = logprobs.gather(1, tok.to(logprobs.device)[:, None]).squeeze(1).double().cpu()
        return _Drawn(tok, log_q, g, (g - psi_prev) / self.pot.beta, r)

    def _tilted(self, rows, logprobs, prefixes, psi_prev, boundary, last, forced, generator) -> _Drawn:
        """x_t ~ q ∝ pi0 exp(phi/beta) with phi = Delta on the top-k tokens, 0 elsewhere; log w from
        :func:`tilted_log_weight`."""
        beta = self.pot.beta
        eos = torch.tensor(self.prior.eos_token_ids)
        m, V = logprobs.shape
        k = min(self.lookahead, V)
        top = logprobs.topk(k, dim=-1)
        cand, top_lp = top.indices.cpu(), top.values.double().cpu()  # (m, k)
        cand_ended = torch.isin(cand, eos) | last  # (m, k)
        twist_now = boundary and self.pot.twist is not None
        # Score the candidates that need it (ended ones: true reward; others: the twist at
        # boundaries); tokens with pi0 = 0 get no call.
        need = (cand_ended | twist_now) & torch.isfinite(top_lp)  # (m, k)
        g_c, r_c = self._score(
            rows.repeat_interleave(k), [p for p in prefixes for _ in range(k)], cand.reshape(-1).tolist(),
            cand_ended.reshape(-1), need.reshape(-1), psi_prev.repeat_interleave(k),
        )  # fmt: skip
        g_c, r_c = g_c.view(m, k), r_c.view(m, k)
        delta_c = g_c - psi_prev[:, None]  # (m, k)
        # Candidates the twist forbids are never proposed: check them as killed particles.
        self._check_forbidden(rows, prefixes, cand, torch.isfinite(top_lp) & ~cand_ended & torch.isneginf(g_c))
        # Rows where q has no mass (every token with pi0 > 0 is a candidate with Delta = -inf) die;
        # the kernel would refuse them, so they are drawn as anything and weighted -inf.
        covered = torch.isfinite(logprobs).sum(-1).cpu() <= k  # (m,)
        dead = covered & torch.isneginf(top_lp + delta_c / beta).all(-1)  # (m,)
        phi_c = delta_c.float().double() if logprobs.is_cuda else delta_c  # (m, k) phi exactly as q uses it (kernels: fp32)
        tok = cand[:, 0].clone()  # (m,) dead rows keep their most likely token
        log_norm = torch.full((m,), -math.inf, dtype=torch.float64)
        live = (~dead).nonzero().squeeze(1)
        if live.numel():
            dev = logprobs.device
            draw = tilted_sample(
                logprobs if live.numel() == m else logprobs.index_select(0, live.to(dev)), potential=phi_c[live].to(dev),
                candidates=cand[live].to(dev), beta=beta, generator=streams.take(generator, live) if live.numel() < m else generator,
            )  # fmt: skip
            tok[live], log_norm[live] = draw.tokens.cpu(), draw.log_norm.double().cpu()
        tok = self._force(tok, forced)
        hit_c = cand == tok[:, None]  # (m, k)
        hit = hit_c.any(-1)  # (m,)
        pos = hit_c.float().argmax(-1, keepdim=True)  # (m, 1)
        g = torch.where(hit, g_c.gather(1, pos).squeeze(1), psi_prev)  # (m,)
        r = torch.where(hit, r_c.gather(1, pos).squeeze(1), math.nan)
        # A sampled non-candidate: q used phi = 0 for it, its true Delta is evaluated now.
        ended = torch.isin(tok, eos) | last  # (m,)
        miss_need = ~hit & (ended | twist_now) & ~dead
        if bool(miss_need.any()):
            g2, r2 = self._score(rows, prefixes, tok.tolist(), ended, miss_need, g)
            g, r = g2, torch.where(miss_need, r2, r)
        delta = g - psi_prev  # (m,)
        phi = torch.where(hit, phi_c.gather(1, pos).squeeze(1), 0.0)  # (m,) the potential q used for the token
        log_inc = tilted_log_weight(log_norm, delta, phi, beta)
        tok_lp = logprobs.gather(1, tok.to(logprobs.device)[:, None]).squeeze(1).double().cpu()
        log_q = torch.where(torch.isneginf(log_norm), -math.inf, tok_lp + phi / beta - log_norm)
        return _Drawn(tok, log_q, torch.where(torch.isneginf(log_inc), -math.inf, g), log_inc, r)

    def _tilted_dense(self, rows, logprobs, prefixes, psi_prev, dense, last, forced, generator) -> _Drawn:
        """x_t ~ q ∝ pi0 exp(phi/beta), phi(v) = psi(x·v) - psi_{t-1} for every v (one next_values
        call); log w = log L where the token does not end, log L + (Delta - phi)/beta where it does."""
        beta = self.pot.beta
        eos = torch.tensor(self.prior.eos_token_ids)
        m, V = logprobs.shape
        phi = dense - psi_prev[:, None]  # (m, V) float64
        ending = torch.zeros(V, dtype=torch.bool)
        ending[list(self.prior.eos_token_ids)] = True
        forbid = torch.isfinite(logprobs).cpu() & torch.isneginf(dense) & ~(ending[None, :] | last)  # (m, V)
        if bool(forbid.any()):
            ri, vi = forbid.nonzero(as_tuple=True)
            self._check_forbidden(rows, prefixes, vi[:, None], torch.ones(vi.numel(), 1, dtype=torch.bool), row_of=ri)
        lp64 = logprobs.double().cpu()
        log_norm = torch.logsumexp(lp64 + phi / beta, -1)  # (m,) float64 (-inf: no proposal mass)
        dead = torch.isneginf(log_norm)
        tok = torch.zeros(m, dtype=torch.long)
        tok[dead] = logprobs.argmax(-1).cpu()[dead]
        live = (~dead).nonzero().squeeze(1)
        if live.numel():
            dev = logprobs.device
            pot = phi.float() if logprobs.is_cuda else phi  # the CUDA kernel reads fp32
            draw = tilted_sample(
                logprobs if live.numel() == m else logprobs.index_select(0, live.to(dev)),
                potential=(pot if live.numel() == m else pot[live]).to(dev), beta=beta,
                generator=streams.take(generator, live) if live.numel() < m else generator,
            )  # fmt: skip
            tok[live] = draw.tokens.cpu()
        tok = self._force(tok, forced)
        ended = torch.isin(tok, eos) | last  # (m,)
        phi_tok = phi.gather(1, tok[:, None]).squeeze(1)  # (m,)
        g, r = self._score(rows, prefixes, tok.tolist(), ended, ended & ~dead, dense.gather(1, tok[:, None]).squeeze(1))
        delta = g - psi_prev
        log_inc = torch.where(ended, tilted_log_weight(log_norm, delta, phi_tok, beta), log_norm)
        log_inc = torch.where(dead, -math.inf, log_inc)
        log_q = torch.where(dead, -math.inf, lp64.gather(1, tok[:, None]).squeeze(1) + phi_tok / beta - log_norm)
        return _Drawn(tok, log_q, torch.where(torch.isneginf(log_inc), -math.inf, g), log_inc, r)


# --------------------------------------------------------------------------------------------------
# Blocks over any prior (continue_prefixes), with decode-ahead
# --------------------------------------------------------------------------------------------------
def _place(buf, buf_lp, end, done, i: int, start: int, tokens, log_probs, eos: set[int], complete: bool = True) -> None:
    """Write particle ``i``'s drawn tokens and their log pi0 at absolute positions from ``start``
    (in place); ``done``: the draw is ``complete`` and ended at an EOS token."""
    L = len(tokens)
    buf[i, start : start + L] = torch.as_tensor(tokens, dtype=torch.long)
    buf_lp[i, start : start + L] = torch.as_tensor(log_probs, dtype=torch.float32)
    end[i] = start + L
    done[i] = complete and L > 0 and int(tokens[-1]) in eos


class BlockCarry(NamedTuple):
    """Tokens drawn ahead: particle i's continuation is drawn up to absolute position ``end[i]``
    (tokens at [t, end[i]) are not revealed yet); ``done[i]``: that continuation reached EOS."""

    tokens: torch.Tensor  # (P·N, T) int64 at absolute positions
    log_probs: torch.Tensor  # (P·N, T) float32 log pi0 of each drawn token
    end: torch.Tensor  # (P·N,) int64
    done: torch.Tensor  # (P·N,) bool
    quiet: torch.Tensor  # (P,) int64 boundaries since the prompt last resampled (the adaptive horizon)
    # With a stream (priors with STREAM): particle i's continuation is stream handle ``handle[i]``
    # (-1: none running), whose first token sits at absolute position ``start[i]``.
    stream: Stream | None = None
    handle: torch.Tensor | None = None  # (P·N,) int64
    start: torch.Tensor | None = None  # (P·N,) int64


@dataclass
class BlockModel(SMCModel):
    """Blocks of ``block_size`` tokens from ``prior.continue_prefixes`` (the bootstrap proposal).

    ``decode_ahead``: draw each running particle's continuation ahead in one call and reveal it
    block by block; after resampling, one offspring of each ancestor keeps the drawn future and
    only the others are re-submitted (exactly block SMC for any horizon that depends on the past
    only: see the module docstring). The horizon: True: the whole continuation, kept running in
    the prior's stream, on a prior with ``STREAM``; else adaptive, 2^q blocks where q is the
    number of boundaries since the prompt last resampled (1 block right after a resampling, as
    far as the run has gone quietly otherwise: futures of particles that resampling kills are
    decoded for nothing, so the horizon grows only while resampling is rare); an int k >= 1: k
    blocks; False: one block (block SMC, one call per block)."""

    pot: Potentials
    block_size: int = 1
    decode_ahead: bool | int = True

    def __post_init__(self):
        tw = self.pot.twist
        if tw is not None and tw.needs_hidden:
            raise ValueError(
                f"twist {tw.name!r} reads hidden states; {type(self.pot.prior).__name__} gives sequences only (no "
                "next-token distributions or hidden states): use a twist of texts or a step-wise prior"
            )

    @property
    def prior(self) -> Prior:
        return self.pot.prior

    @property
    def config(self) -> EngineConfig:
        return self.pot.cfg

    def init(self, prompt_ids, num_particles):
        B, T = len(prompt_ids) * num_particles, self.pot.max_new_tokens
        pad = self.prior.eos_token_ids[0]
        carry = BlockCarry(
            torch.full((B, T), pad, dtype=torch.long), torch.zeros(B, T), torch.zeros(B, dtype=torch.long),
            torch.zeros(B, dtype=torch.bool), torch.zeros(len(prompt_ids), dtype=torch.long),
        )  # fmt: skip
        if self.decode_ahead is True and self.prior.has(STREAM):
            none = torch.full((B,), -1, dtype=torch.long)
            carry = carry._replace(stream=self.prior.open_stream(), handle=none, start=none.clone())
        return carry

    def close(self, carry: BlockCarry) -> None:
        """Cancel the continuations still running in the prior's stream (the run is over)."""
        if carry.stream is not None:
            carry.stream.close()

    def step_tokens(self, t: int) -> int:
        return min(self.block_size, self.pot.max_new_tokens - t)

    def propose(self, state: SMCState, rows: torch.Tensor, *, forced: Forced | None, generator) -> Move:
        c: BlockCarry = state.carry
        p, t = state.particles, state.t
        P, N = p.lengths.shape
        T = self.pot.max_new_tokens
        k = self.step_tokens(t)
        pad = self.prior.eos_token_ids[0]
        eos = torch.tensor(self.prior.eos_token_ids)
        ends = set(self.prior.eos_token_ids)
        flat_tok = p.tokens.reshape(P * N, -1)
        buf, buf_lp, end, done = c.tokens.clone(), c.log_probs.clone(), c.end.clone(), c.done.clone()
        is_forced = torch.zeros(rows.numel(), dtype=torch.bool) if forced is None else forced.rows
        # Rows whose drawn continuation does not cover this block (and has not ended) are submitted.
        short = ~done[rows] & (end[rows] < t + k) & ~is_forced  # (m,)
        sub = rows[short]
        handle, start = c.handle, c.start
        if c.stream is not None and sub.numel():
            handle, start = self._stream(c, sub, t, t + k, flat_tok, buf, buf_lp, end, done, streams.take(generator, short.nonzero().squeeze(1)))
        elif sub.numel():
            ids = sub.tolist()
            have = end[sub]
            prefixes = [flat_tok[i, :t].tolist() + buf[i, t : int(e)].tolist() for i, e in zip(ids, have.tolist())]
            ahead = self.decode_ahead
            if ahead is True:
                blocks = torch.pow(2, c.quiet[sub // N].clamp(max=30))  # (s,) adaptive: 2^quiet
            else:
                blocks = torch.full((sub.numel(),), 1 if ahead is False else int(ahead), dtype=torch.long)
            horizon = (t + self.block_size * blocks).clamp(max=T)
            horizon = torch.maximum(horizon, torch.full_like(horizon, t + k))
            ext = self.prior.continue_prefixes([self.pot.prompt_rows[i] for i in ids], prefixes, (horizon - have).tolist(),
                                               generator=streams.take(generator, short.nonzero().squeeze(1)))  # fmt: skip
            new_tok, new_len, new_lp = ext.tokens.cpu(), ext.lengths.cpu(), ext.token_log_probs.float().cpu()
            for j, (i, e) in enumerate(zip(ids, have.tolist())):
                L = int(new_len[j])
                _place(buf, buf_lp, end, done, i, e, new_tok[j, :L], new_lp[j, :L], ends)
        if forced is not None and bool(forced.rows.any()):  # the reference's block: scored, not drawn
            fr = rows[forced.rows]
            ftok, flen = forced.tokens[forced.rows], forced.lengths[forced.rows]
            full = [flat_tok[i, :t].tolist() + ftok[j, : int(L)].tolist() for j, (i, L) in enumerate(zip(fr.tolist(), flen.tolist()))]
            width = max(len(s) for s in full)
            toks = torch.full((len(full), 1, width), pad, dtype=torch.long)
            for j, s in enumerate(full):
                toks[j, 0, : len(s)] = torch.tensor(s, dtype=torch.long)
            lens = torch.tensor([len(s) for s in full], dtype=torch.long)
            lp = self.prior.token_log_probs([self.pot.prompt_rows[i] for i in fr.tolist()], toks, lens[:, None]).float()[:, 0]
            for j, (i, L) in enumerate(zip(fr.tolist(), flen.tolist())):
                _place(buf, buf_lp, end, done, i, t, ftok[j, :L], lp[j, t : t + L], ends)
        # Reveal this block: up to k tokens, stopping after EOS.
        blk = buf[rows, t : t + k]  # (m, k)
        blk_lp = buf_lp[rows, t : t + k].double()
        avail = (end[rows] - t).clamp(max=k)  # (m,)
        pos = torch.arange(k)
        is_eos = torch.isin(blk, eos) & (pos[None, :] < avail[:, None])
        first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, avail)
        new_len = first_eos  # (m,) >= 1
        valid = pos[None, :] < new_len[:, None]
        blk = torch.where(valid, blk, pad)
        log_prior = torch.where(valid, blk_lp, 0.0).sum(-1)  # (m,) float64
        last = blk.gather(1, (new_len - 1).clamp(min=0)[:, None]).squeeze(1)
        ended = torch.isin(last, eos) | (t + new_len >= T)  # (m,)
        psi_prev = p.psi.reshape(-1)[rows]  # (m,)
        need = ended | (self.pot.twist is not None)
        g, r = psi_prev.clone(), torch.full_like(psi_prev, math.nan)
        idx = need.nonzero().squeeze(1)
        seqs = [flat_tok[i, :t].tolist() + blk[j, : int(new_len[j])].tolist() for j, i in enumerate(rows.tolist())]
        if idx.numel():
            g[idx], r[idx] = self.pot(rows[idx], [seqs[j] for j in idx.tolist()], ended[idx])
        killed = ~ended & torch.isneginf(g)
        if bool(killed.any()):
            kk = killed.nonzero().squeeze(1)
            self.pot.check_kills(rows[kk], [seqs[j] for j in kk.tolist()])
        log_inc = (g - psi_prev) / self.pot.beta
        return Move(
            tokens=blk, lengths=new_len, log_prior=log_prior, log_q=log_prior, potential=g, log_increment=log_inc,
            ended=ended, reward=r, boundary=True, carry=BlockCarry(buf, buf_lp, end, done, c.quiet, c.stream, handle, start),
        )  # fmt: skip

    def _stream(self, c: BlockCarry, sub, t: int, until: int, flat_tok, buf, buf_lp, end, done, generator):
        """Rows ``sub`` (at position ``t``) need tokens up to absolute position ``until``: submit a continuation for
        those with none running (the particle's whole future), wait until every one has drawn that
        far (or ended) and copy what was drawn into ``buf`` / ``buf_lp`` / ``end`` / ``done``
        (in place: the caller's copies). Returns the new handles and starts."""
        stream, handle, start = c.stream, c.handle.clone(), c.start.clone()
        T = self.pot.max_new_tokens
        eos = set(self.prior.eos_token_ids)
        ids = sub.tolist()
        fresh = [j for j, i in enumerate(ids) if handle[i] < 0]  # positions in sub (row j of per-row streams)
        new = [ids[j] for j in fresh]
        for i, seed in zip(new, request_seeds(streams.take(generator, fresh), len(new))):
            e = int(end[i])
            prefix = flat_tok[i, :t].tolist() + buf[i, t:e].tolist()
            handle[i] = stream.submit(self.pot.prompt_rows[i], prefix, T - e, seed=seed)
            start[i] = e
        stream.wait({int(handle[i]): until - int(start[i]) for i in ids})
        for i in ids:
            toks, lps, finished = stream.read(int(handle[i]))
            _place(buf, buf_lp, end, done, i, int(start[i]), toks, lps, eos, complete=finished)
        return handle, start

    def advance(self, carry: BlockCarry, particles: Particles, src, running, resampled) -> BlockCarry:
        """Resampled particles: the first offspring of each ancestor keeps its drawn future, the
        others start empty (re-submitted at the next block)."""
        quiet = torch.where(resampled, 0, carry.quiet + 1)
        if not bool(resampled.any()):
            return self._keep_streams(carry._replace(quiet=quiet), running)
        B = src.numel()
        first = torch.zeros(B, dtype=torch.bool)
        seen: set[int] = set()
        for i, a in enumerate(src.tolist()):
            if a not in seen:
                seen.add(a)
                first[i] = True
        t_now = particles.lengths.reshape(-1)  # running particles: the position they are at
        end = torch.where(first, carry.end[src], t_now)
        done = first & carry.done[src]
        out = BlockCarry(carry.tokens[src], carry.log_probs[src], end, done, quiet, carry.stream)
        if carry.stream is not None:
            out = out._replace(handle=torch.where(first, carry.handle[src], -1), start=carry.start[src])
            out = self._keep_streams(out, running, before=carry.handle)
        return out

    @staticmethod
    def _keep_streams(carry: BlockCarry, running: torch.Tensor, before: torch.Tensor | None = None) -> BlockCarry:
        """Cancel the continuations no running particle holds any more (resampled away, ended, dead)."""
        if carry.stream is None:
            return carry
        handle = torch.where(running.reshape(-1), carry.handle, -1)
        gone = set((carry.handle if before is None else before).tolist()) - set(handle.tolist()) - {-1}
        if gone:
            carry.stream.cancel(sorted(gone))
        return carry._replace(handle=handle)


__all__ = ["BlockModel", "Potentials", "PROPOSALS", "TokenModel", "tilted_log_weight"]
