"""A language model as its own judge: r(x) = log P(the model answers "Yes" to a question about x).

For a question q and text x, the judge prompt J(q, x) is continued with the answers ``yes`` and
``no`` (token sequences) and scored with the prior's own ``log_prob``:

    normalize=True (default):  r(x) = log p(yes | J) - log(p(yes | J) + p(no | J)) = log P(Yes | {Yes, No})
    normalize=False:           r(x) = log p(yes | J)

both <= 0. No extra model is loaded. With a prior that has temperature / top-k / top-p, the judge
answers under that modified distribution; pass an unmodified prior to judge with the model itself.
"""

from __future__ import annotations

import torch

from posterior.priors.base import Prior
from posterior.rewards.base import Reward, RewardError
from posterior.validate import check_int

TEMPLATE = 'Text: "{text}"\nQuestion: {question}\nAnswer (Yes or No):'


class LMJudge(Reward):
    """log-probability that ``prior`` answers ``yes`` (rather than ``no``) to ``question`` about a text.

    Parameters
    ----------
    prior : Prior
        The judging model (an ``HFPrior``, ``CallablePrior``, ...); its ``log_prob`` scores the answers.
    question : str
        Asked about each text, e.g. "Is this text polite?".
    yes, no : str
        The two answers, continuing the judge prompt (with a chat prior, ``"Yes"``/``"No"`` without
        the leading space usually fit the assistant turn better).
    normalize : bool
        True: log P(yes | yes or no), normalised over the two answers. False: the raw log p(yes).
    template : str
        The judge prompt, with ``{text}`` and ``{question}`` fields.
    batch_size : int
        Texts per ``log_prob`` call.
    accepts_prefixes : bool
        Declare the question meaningful on partial texts (SMC then uses the judge as a twist).
    """

    def __init__(self, prior: Prior, question: str, *, yes: str = " Yes", no: str = " No", normalize: bool = True,
                 template: str = TEMPLATE, batch_size: int = 16, accepts_prefixes: bool = False):
        if not isinstance(prior, Prior):
            raise ValueError(f"LMJudge needs a posterior prior (HFPrior, CallablePrior), got {type(prior).__name__}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"LMJudge needs a non-empty question, got {question!r}")
        if "{text}" not in template or "{question}" not in template:
            raise ValueError(f"template must contain {{text}} and {{question}}, got {template!r}")
        batch_size = check_int("batch_size", batch_size, 1)
        self.prior, self.question, self.template = prior, question, template
        self.yes, self.no, self.normalize, self.batch_size = yes, no, bool(normalize), batch_size
        self.accepts_prefixes = bool(accepts_prefixes)
        self._answers = []
        for name, answer in (("yes", yes), ("no", no)):
            ids = prior.encode_text(answer) if isinstance(answer, str) else []
            if not ids:
                raise ValueError(f"LMJudge answer {name}={answer!r} encodes to no tokens")
            self._answers.append(ids)
        if self._answers[0] == self._answers[1]:
            raise ValueError(f"LMJudge answers yes={yes!r} and no={no!r} encode to the same tokens")

    def __repr__(self):
        return f"LMJudge({self.question!r}{'' if self.normalize else ', raw'})"

    def prompt(self, text: str) -> str:
        """The judge prompt for ``text``."""
        return self.template.format(text=text, question=self.question)

    def answer_log_probs(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), 2) float64: log p(yes | J(q, x)) and log p(no | J(q, x))."""
        T = max(len(a) for a in self._answers)
        pad = self.prior.eos_token_ids[0]
        answers = torch.full((2, T), pad, dtype=torch.long)
        for i, ids in enumerate(self._answers):
            answers[i, : len(ids)] = torch.tensor(ids)
        answer_len = torch.tensor([len(a) for a in self._answers])
        out = []
        for s in range(0, len(texts), self.batch_size):
            prompts = [self.prompt(t) for t in texts[s : s + self.batch_size]]
            prompt_ids = self.prior.encode_prompts(prompts)
            self.prior.check_lengths(prompt_ids, T, prompts)
            B = len(prompts)
            lp = self.prior.log_prob(prompt_ids, answers.expand(B, 2, T), answer_len.expand(B, 2))  # (B, 2)
            out.append(lp.double())
        return torch.cat(out)

    def score(self, texts):
        lp = self.answer_log_probs(texts)  # (B, 2)
        if not self.normalize:
            return lp[:, 0]
        total = torch.logsumexp(lp, dim=-1)  # (B,)
        dead = torch.isneginf(total).nonzero().flatten().tolist()
        if dead:
            raise RewardError(
                f"{self.name}: the prior gives both answers {self.yes!r} and {self.no!r} probability 0 for text "
                f"{texts[dead[0]]!r} (top-k / top-p prior?); use an unmodified prior as the judge"
            )
        return lp[:, 0] - total
