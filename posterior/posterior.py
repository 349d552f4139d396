"""The posterior pi*(x) ∝ pi0(x) · exp(r(x)/beta) over continuations of each prompt.

This is the target of KL-regularised RL: argmax_pi E_pi[r] - beta KL(pi || pi0) = pi*
(Korbak, Perez & Buckley 2022, "RL with KL penalties is better viewed as Bayesian inference").
``Posterior.sample`` draws from it at decoding time with a registered method and reports how good
the draws are (log Z, ESS, KL(pi*||pi0), reward statistics).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Sequence

import torch

from posterior.priors.base import ROW_STREAMS, Prior
from posterior.results import SampleResult
from posterior.rewards.base import Reward, RewardError, as_reward
from posterior.samplers.registry import get_method
from posterior.streams import Streams
from posterior.validate import as_plain, check_int, check_prompts, check_real, check_seed


class Posterior:
    """pi*(x) ∝ pi0(x) exp(r(x)/beta).

    Parameters
    ----------
    prior : Prior
        pi0 (``HFPrior``, ``CallablePrior``, or any ``posterior.priors.Prior``).
    reward : Reward or callable
        r(x) on continuation texts (a plain function of a list of texts is wrapped).
    beta : float > 0
        Temperature: small beta trusts the reward more, large beta stays near the prior.
    """

    def __init__(self, prior: Prior, reward: Reward, beta: float):
        if not isinstance(prior, Prior):
            raise ValueError(f"prior must be a posterior prior (HFPrior, CallablePrior), got {type(prior).__name__}")
        beta = check_real("beta", beta, positive=True)  # numpy / torch scalars accepted
        self.prior, self.reward, self.beta = prior, as_reward(reward), beta

    def __repr__(self):
        return f"Posterior({type(self.prior).__name__}, {self.reward.name}, beta={self.beta:g})"

    def rewards(self, texts: list[list[str]]) -> torch.Tensor:
        """Rewards of [P][N] texts as one batched call: (P, N) float64."""
        flat = [t for row in texts for t in row]
        r = self.reward(flat)
        if r.shape[0] != len(flat):  # Reward.__call__ checks this; guards custom Reward subclasses
            raise RewardError(f"reward {self.reward.name} returned {r.shape[0]} values for {len(flat)} texts")
        return r.view(len(texts), -1) if flat else r.view(len(texts), 0)

    def log_density(self, texts: Sequence[str], prompt: str | None = None, *, ended: bool = True) -> torch.Tensor:
        """Unnormalised log pi*(x) = log pi0(x | prompt) + r(x)/beta of given continuation texts.

        Texts are tokenised with the prior's tokenizer; ``ended`` appends EOS (the text is a whole
        continuation). Returns (len(texts),) float64.
        """
        texts = list(texts)
        prompts = None if prompt is None else [prompt]
        prompt_ids = self.prior.encode_prompts(_check_prompts(prompts))
        ids = [self.prior.encode_text(t) + ([self.prior.eos_token_ids[0]] if ended else []) for t in texts]
        T = max((len(i) for i in ids), default=0)
        if T == 0:
            raise ValueError("log_density needs at least one non-empty continuation")
        self.prior.check_lengths(prompt_ids, T, prompts)
        tokens = torch.full((1, len(ids), T), self.prior.eos_token_ids[0], dtype=torch.long)
        for i, seq in enumerate(ids):
            tokens[0, i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths = torch.tensor([[len(s) for s in ids]])
        log_prior = self.prior.log_prob(prompt_ids, tokens, lengths)[0].double()
        reward = self.reward.for_prompt("" if prompt is None else prompt, None)  # None: not one of a sampled list
        return log_prior + reward(texts) / self.beta

    def sample(
        self,
        n: int = 16,
        method: str = "is",
        max_new_tokens: int = 32,
        prompts: Sequence[str] | str | None = None,
        seed: int | Sequence[int] | None = 0,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
        **options,
    ) -> SampleResult:
        """Sample pi* for each prompt with ``method``; see ``posterior.samplers.SAMPLERS``.

        ``options`` are the method's own keyword options (e.g. ``proposal=`` for "is",
        ``reward_upper_bound=`` for "rejection", ``best_of=`` for "bon"); unknown names raise.
        Numbers may be Python, numpy or one-element torch scalars (options are passed on as Python
        numbers). Randomness comes from ``generator`` or else a fresh generator seeded with ``seed``;
        ``seed=None`` draws a fresh seed from the operating system's entropy, and ``res.seed``
        records the seed used, so ``sample(..., seed=res.seed)`` replays the run.

        ``seed`` may also be a list with one seed per prompt: prompt p's draws then come only from
        a stream seeded with ``seed[p]`` (:mod:`posterior.streams`), so its sample is the same
        whatever other prompts it is sampled with (up to the backend's batched numerics). Methods
        registered with ``streams=True`` (is, bon, soft_bon, smc) on priors with ``ROW_STREAMS``
        run all prompts in one batched run; any other method or prior runs once per prompt with
        that prompt's own generator. ``res.seed`` is then the list.
        """
        n = check_int("n", n, 1)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        if not isinstance(method, str):
            raise ValueError(f"method must be a str naming a sampler, got {method!r}")
        m = get_method(method)
        if self.reward.needs_prompts:  # it reads prompts: one run per prompt (posterior.samplers.drivers)
            from posterior.samplers.drivers import per_prompt

            m = per_prompt(m)
        opts = m.check_options({k: as_plain(v) for k, v in options.items()})  # TypeError naming an unknown option
        if not isinstance(as_plain(progress), bool):
            raise ValueError(f"progress must be a bool, got {progress!r}")
        prompts = _check_prompts([prompts] if isinstance(prompts, str) else prompts)
        if isinstance(seed, (list, tuple)):  # one seed per prompt: per-prompt streams
            if generator is not None:
                raise ValueError("pass either generator or a list of per-prompt seeds, not both")
            count = 1 if prompts is None else len(prompts)
            if len(seed) != count:
                raise ValueError(f"seed is a list of {len(seed)} seeds but there are {count} prompts: give one seed per prompt")
            seed = [check_seed(f"seed[{i}]", s) for i, s in enumerate(seed)]
            generator = Streams.from_seeds(seed, self.prior.device)
            if not (m.streams and _has_row_streams(self, opts)) and not self.reward.needs_prompts:
                from posterior.samplers.drivers import per_prompt

                m = per_prompt(m, "per-prompt seeds, and this method or prior draws from one stream")  # own generator each
        elif generator is None:
            seed = secrets.randbits(63) if seed is None else _check_seed(seed)
            generator = torch.Generator(device=self.prior.device)
            generator.manual_seed(seed)
        else:
            _check_generator(generator, self.prior.device)
            seed = None  # the generator's state, not a seed, decides the draws
        t0 = time.perf_counter()
        res = m.run(self, prompts, opts, n=n, max_new_tokens=max_new_tokens, generator=generator, progress=bool(progress))
        return dataclasses.replace(res, seconds=time.perf_counter() - t0, seed=seed)


def _has_row_streams(post, options) -> bool:
    """Whether every prior a run uses (the posterior's, and any option that is a prior, such as
    IS's ``proposal``) draws per-row streams."""
    values = [getattr(options, f.name) for f in dataclasses.fields(options)]
    priors = [post.prior] + [v for v in values if isinstance(v, Prior)]
    return all(p.has(ROW_STREAMS) for p in priors)


def _check_generator(generator, device: torch.device) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}: {generator!r}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(
            f"generator is on {generator.device} but the prior runs on {device}; "
            f"make it with torch.Generator(device={str(device)!r})"
        )


# The old private names of the prompt and seed checks, importable as before: the checks are
# posterior.validate's (issue 28.5).
_check_prompts = check_prompts


def _check_seed(seed) -> int | None:
    """A seed is an int in [0, 2**64) (numpy / torch integers accepted), or None."""
    return check_seed("seed", seed, or_none=True)


__all__ = ["Posterior"]
