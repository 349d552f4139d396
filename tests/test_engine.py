"""The SMC engine (posterior.samplers.engine) on a toy model side that is no language model.

The engine owns particles, weights, resampling and log Ẑ; a model side supplies moves. Here the
model side is an i.i.d. chain of T symbols: pi0(x) = prod_t p0(x_t), reward r(x) = sum_t f(x_t),
twist psi_t = sum_{s<=t} f(x_s), proposal q (i.i.d. over symbols). Then, exactly,

    Z = sum_x pi0(x) exp(r(x)/beta) = (sum_v p0(v) exp(f(v)/beta))^T,

and with the locally optimal proposal q(v) ∝ p0(v) exp(f(v)/beta) every incremental weight is
log sum_v p0(v) exp(f(v)/beta): each run's log Ẑ equals log Z to rounding and the ESS is N.
"""

import math

import pytest
import torch

from posterior.samplers.engine import EngineConfig, Move, SMCModel, run

V, T, BETA = 3, 3, 0.5
LOG_P0 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
F = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
LOG_Z_STEP = float(torch.logsumexp(LOG_P0 + F / BETA, 0))  # log sum_v p0(v) exp(f(v)/beta)


class IIDChain(SMCModel):
    """T symbols drawn i.i.d. from ``log_q``; potentials are running sums of f (the reward at the end)."""

    def __init__(self, log_q: torch.Tensor):
        self.log_q = log_q

    def init(self, prompt_ids, num_particles):
        return None

    def step_tokens(self, t):
        return 1

    def propose(self, state, rows, *, forced, generator):
        m = rows.numel()
        tok = torch.multinomial(self.log_q.exp().expand(m, V), 1, generator=generator)  # (m, 1)
        if forced is not None:
            tok = torch.where(forced.rows[:, None], forced.tokens[:, :1], tok)
        v = tok[:, 0]
        psi_old = state.particles.psi.reshape(-1)[rows]  # (m,)
        psi = psi_old + F[v]
        ended = torch.full((m,), state.t + 1 == T)
        return Move(
            tokens=tok, lengths=torch.ones(m, dtype=torch.long), log_prior=LOG_P0[v], log_q=self.log_q[v], potential=psi,
            log_increment=LOG_P0[v] - self.log_q[v] + (psi - psi_old) / BETA, ended=ended,
            reward=torch.where(ended, psi, math.nan), boundary=True, carry=None,
        )  # fmt: skip

    def advance(self, carry, particles, src, running, resampled):
        return None


def log_Z_hat(state) -> torch.Tensor:
    return torch.logsumexp(state.particles.log_weights, -1) - math.log(state.particles.log_weights.shape[1])  # (P,)


def test_engine_with_the_optimal_proposal_gives_log_z_exactly_and_full_ess():
    optimal = torch.log_softmax(LOG_P0 + F / BETA, 0)
    cfg = EngineConfig(beta=BETA, num_particles=5, max_new_tokens=T, ess_threshold=1.0)
    state, infos = run(IIDChain(optimal), [[]] * 4, cfg, generator=torch.Generator().manual_seed(0), pad=V)
    assert len(infos) == T and bool(state.particles.ended.all())
    assert torch.allclose(log_Z_hat(state), torch.full((4,), T * LOG_Z_STEP, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(torch.stack([i.log_Z_increment for i in infos]).sum(0), log_Z_hat(state), atol=1e-12, rtol=0)
    for info in infos:
        assert torch.allclose(info.ess.double(), torch.full((4,), 5.0, dtype=torch.float64), atol=1e-9, rtol=0)
    assert torch.equal(state.particles.reward, state.particles.psi)  # the last potential is r


@pytest.mark.parametrize("threshold, scheme", [(0.0, "systematic"), (0.5, "systematic"), (1.0, "multinomial")])
def test_engine_z_hat_is_unbiased_on_a_toy_model_side(threshold, scheme):
    """R independent runs (one per prompt row) from a uniform proposal: mean Ẑ/Z = 1 within 4
    standard errors (the error of the mean of R = 4000 ratios), for any resampling schedule."""
    R, N = 4000, 4
    cfg = EngineConfig(beta=BETA, num_particles=N, max_new_tokens=T, ess_threshold=threshold, resampling=scheme)
    uniform = torch.full((V,), -math.log(V), dtype=torch.float64)
    state, infos = run(IIDChain(uniform), [[]] * R, cfg, generator=torch.Generator().manual_seed(1), pad=V)
    ratio = (log_Z_hat(state) - T * LOG_Z_STEP).exp()  # (R,) Ẑ / Z
    se = float(ratio.std()) / math.sqrt(R)
    assert abs(float(ratio.mean()) - 1.0) < 4 * se, (float(ratio.mean()), se)
    resampled = torch.stack([i.resampled for i in infos]).any(0)
    assert bool(resampled.any()) == (threshold > 0)  # threshold 0 never resamples
