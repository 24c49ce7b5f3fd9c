"""The selection policy every selecting strategy shares: a weighted vote over answer groups.

A candidate's quality is the weighted sum of its verifier scores (the ``confidence`` verifier,
LLM aspect verifiers, the ``execution`` verifier...); its vote weight is CISC's softmax of that
quality at ``temperature`` (``None``: every candidate weighs 1, plain majority); an optional
DeepConf filter keeps only the ``keep`` most confident share before voting. Malformed replies
(``strategies.answers.form``: truncated, code without an answer, a copied placeholder) vote
only when no well-formed candidate does. The reply returned is the best candidate inside the
winning group; the rest follow, best group first. ``rank`` applies a policy to candidates.

``SelectionPolicy`` is the extension point (``choose``); ``WeightedVote`` is the reference
implementation and the default. No upstream calls.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from strategies import vote as V
from strategies.answers import FORM_OK
from strategies.base import Candidate
from strategies.verifiers.confidence import DEFAULT_SIGNAL, to_unit


@dataclass(frozen=True)
class Ballot:
    """What a policy sees of one candidate: its answer (None: abstains), well-formedness rank
    (``FORM_OK`` best) and verifier scores by name (None where a verifier gave none)."""

    answer: str | None
    form: int = FORM_OK
    scores: Mapping[str, float | None] = field(default_factory=dict)
    tiebreak: float | None = None  # breaks ties of quality inside a group (the mean token logprob)


@dataclass(frozen=True)
class Choice:
    """The order to return candidates in (indices, best first), the winning answer, each
    answer's share of the vote, and each candidate's quality (None where unscored)."""

    order: list[int]
    answer: str | None
    shares: dict[str, float]
    quality: list[float | None]

    @property
    def agreement(self) -> float:
        """The winning answer's share of the vote (0 when every candidate abstained)."""
        return self.shares.get(self.answer, 0.0) if self.answer is not None else 0.0


class SelectionPolicy(abc.ABC):
    """Chooses among candidates. Contract: ``choose`` returns every index exactly once, best first;
    it never calls the upstream and never raises for missing scores."""

    @abc.abstractmethod
    def choose(self, ballots: Sequence[Ballot]) -> Choice:
        """The ranking of ``ballots``."""


@dataclass(frozen=True)
class WeightedVote(SelectionPolicy):
    """CISC-weighted answer-group vote with an optional DeepConf filter (see the module doc).
    ``weights``: verifier name -> weight (a name not listed weighs 0); ``temperature`` None for
    a plain majority; ``keep`` in (0, 1]."""

    weights: Mapping[str, float] = field(default_factory=lambda: {"confidence": 1.0})
    temperature: float | None = 0.1
    keep: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError("temperature must be positive (or None for a plain majority)")
        if not 0 < self.keep <= 1:
            raise ValueError("keep must be in (0, 1]")
        if any(not (0 <= w < math.inf) for w in self.weights.values()):
            raise ValueError("weights must be finite and at least 0")

    def quality(self, b: Ballot) -> float | None:
        """The weighted mean of the candidate's verifier scores (None when none is weighted)."""
        total = weight = 0.0
        for name, w in self.weights.items():
            s = b.scores.get(name)
            if w > 0 and s is not None:
                total += w * s
                weight += w
        return total / weight if weight else None

    def choose(self, ballots: Sequence[Ballot]) -> Choice:
        n = len(ballots)
        q = [self.quality(b) for b in ballots]
        answers = [b.answer for b in ballots]
        forms = [b.form for b in ballots]
        w = V.weights_uniform(n) if self.temperature is None else V.weights_softmax(q, self.temperature)
        mask = V.keep_top(q, self.keep) if self.keep < 1 else [True] * n
        well = [m and f == FORM_OK and a is not None for m, f, a in zip(mask, forms, answers, strict=True)]
        if any(well):
            mask = well
        out = V.vote(answers, w, quality=q, mask=mask, rank=forms)
        # the vote's winner first (its tie-break decided between equal shares), then by share
        group_rank = {a: i for i, a in enumerate(sorted(out.shares, key=lambda a: (a != out.answer, -out.shares[a])))}

        def key(i: int) -> tuple[int, int, float, float, int]:
            a = answers[i]
            g = group_rank.get(a, len(group_rank)) if a is not None else len(group_rank) + 1
            qi, ti = q[i], ballots[i].tiebreak
            return (g, forms[i], -(qi if qi is not None else -math.inf), -(ti if ti is not None else -math.inf), i)

        order = sorted(range(n), key=key)
        return Choice(order, out.answer, out.shares, q)


def ballots(cands: Sequence[Candidate], signal: str = DEFAULT_SIGNAL) -> list[Ballot]:
    """Ballots for candidates: the ``confidence`` score from their token logprobs, plus every
    verifier verdict they carry (``c.verdicts[name]["score"]``, names without ``aspect:``)."""
    out = []
    for c in cands:
        scores: dict[str, float | None] = {}
        for name, v in c.verdicts.items():
            if isinstance(v, dict):
                scores[name.removeprefix("aspect:")] = v.get("score")
        value = c.confidence.get(signal) if c.confidence is not None else None
        scores.setdefault("confidence", to_unit(signal, value) if value is not None else None)
        out.append(Ballot(c.answer, c.form, scores, c.logprob))
    return out


def rank(cands: Sequence[Candidate], policy: SelectionPolicy,
         signal: str = DEFAULT_SIGNAL) -> tuple[list[Candidate], Choice]:
    """The candidates best first by ``policy``. A program-aided candidate is returned first only
    when no prose candidate shares its answer (its reply is code; a prose one reads better)."""
    choice = policy.choose(ballots(cands, signal))
    ranked = [cands[i] for i in choice.order]
    if ranked and ranked[0].program:
        prose = next((c for c in ranked if not c.program and c.answer == ranked[0].answer), None)
        if prose is not None:
            ranked.remove(prose)
            ranked.insert(0, prose)
    for c, q in zip(cands, choice.quality, strict=True):
        if q is not None:
            c.scores["quality"] = q
        if c.answer is not None:
            c.scores["vote_share"] = choice.shares.get(c.answer, 0.0)
    return ranked, choice


def best_draft(drafts: Sequence[Candidate], temperature: float | None = 0.1) -> Candidate:
    """The draft to return of a sequence of attempts (critique-and-refine rounds, search paths):
    the answer-group vote over them with confidence and any ``critique`` verdict weighing equally,
    so a refinement the model is less sure of does not replace a better first draft. Ties go to
    the later draft (with nothing to tell them apart, the refinement stands)."""
    if not drafts:
        raise ValueError("no drafts to choose from")
    policy = WeightedVote(weights={"confidence": 1.0, "critique": 1.0}, temperature=temperature)
    ranked, _ = rank(list(reversed(drafts)), policy)
    return ranked[0]
