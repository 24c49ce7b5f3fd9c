"""Choosing one answer among candidates by voting at the level of answer groups.

Candidates that share a normalised answer form a group; a group's score is the sum of its
members' weights; the winner is the best-scoring group, and the reply returned is the most
confident candidate inside it. The rules, all pure functions over plain numbers:
- ``weights_uniform``: plain majority (self-consistency, Wang et al. 2023);
- ``weights_softmax``: CISC (Taubenfeld et al., arXiv 2502.06233): softmax of a confidence score
  over the candidates at a temperature; low temperatures approach "trust the most confident",
  high ones approach majority;
- ``keep_top``: DeepConf's filter (arXiv 2508.15260): drop the least confident share first;
- ``weights_borda``: Borda-style rank weights, ``(N - rank)^p`` (Kang et al., arXiv 2502.18581);
- ``should_stop``: Adaptive-Consistency's Beta stopping rule (Aggarwal et al., arXiv 2305.11860):
  stop sampling once P(leading answer beats the runner-up) passes a threshold.

Candidates with no answer (None) abstain. Pure: imports nothing from the server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outcome:
    """The vote's result: the winning answer (None when every candidate abstained), the index of
    the candidate to return, each answer's share of the total weight, and the winner's margin
    over the runner-up (shares)."""

    answer: str | None
    index: int | None
    shares: dict[str, float] = field(default_factory=dict)
    margin: float = 0.0


def weights_uniform(n: int) -> list[float]:
    return [1.0] * n


def weights_softmax(scores: Sequence[float | None], temperature: float) -> list[float]:
    """CISC's weights: ``softmax(score / temperature)``; a candidate without a score weighs 0
    (all without: uniform)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    present = [s for s in scores if s is not None]
    if not present:
        return weights_uniform(len(scores))
    m = max(present)
    ex = [0.0 if s is None else math.exp((s - m) / temperature) for s in scores]
    z = sum(ex)
    return [e / z for e in ex]


def _num(x: float | None) -> float:
    return -math.inf if x is None else x


def weights_borda(scores: Sequence[float | None], power: float = 1.0) -> list[float]:
    """Rank weights: the most confident of N gets ``N^p``, the least ``1^p``; ties share the
    better rank; no score ranks last."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: -_num(scores[i]))
    w = [0.0] * n
    for rank, i in enumerate(order):
        # ties share the better rank, so equal confidence gives equal weight
        first = next(r for r, j in enumerate(order) if scores[j] == scores[i]) if scores[i] is not None else rank
        w[i] = float(n - first) ** power
    return w


def keep_top(scores: Sequence[float | None], keep: float) -> list[bool]:
    """DeepConf's filter: keep the ``keep`` share (0 < keep <= 1, at least one) of candidates by
    score, dropping the least confident first; no score is dropped first; ties at the cut kept."""
    if not 0 < keep <= 1:
        raise ValueError("keep must be in (0, 1]")
    n = len(scores)
    if n == 0:
        return []
    k = max(1, math.ceil(keep * n - 1e-9))
    vals = sorted((s for s in scores if s is not None), reverse=True)
    if len(vals) < k:
        return [True] * n if not vals else [s is not None for s in scores]
    cut = vals[k - 1]
    return [s is not None and s >= cut for s in scores]


def tally(answers: Sequence[str | None], weights: Sequence[float],
          mask: Sequence[bool] | None = None) -> dict[str, float]:
    """Each answer's total weight over the candidates that vote (answer not None, mask true)."""
    if len(answers) != len(weights):
        raise ValueError("one weight per answer")
    out: dict[str, float] = {}
    for i, (a, w) in enumerate(zip(answers, weights, strict=True)):
        if a is None or (mask is not None and not mask[i]):
            continue
        out[a] = out.get(a, 0.0) + w
    return out


def vote(answers: Sequence[str | None], weights: Sequence[float], *,
         quality: Sequence[float | None] | None = None, mask: Sequence[bool] | None = None,
         rank: Sequence[int] | None = None) -> Outcome:
    """The weighted vote over answer groups. Ties between groups go to the group holding the
    candidate best by (``rank`` ascending, ``quality`` descending, index); the candidate returned
    is the best one inside the winning group by the same order. ``rank`` orders well-formedness
    (0 best: finished normally; higher: truncated, code without an answer...), so a malformed
    reply is returned only when no well-formed one shares its answer."""
    n = len(answers)
    q = list(quality) if quality is not None else [None] * n
    r = list(rank) if rank is not None else [0] * n

    def key(i: int) -> tuple[int, float, int]:
        qi = q[i]
        return (r[i], -(qi if qi is not None else -math.inf), i)

    totals = tally(answers, weights, mask)
    if not totals:
        best_any = min(range(n), key=key) if n else None
        return Outcome(None, best_any)
    total = sum(totals.values())
    best_of = {a: min((i for i in range(n) if answers[i] == a and (mask is None or mask[i])), key=key)
               for a in totals}
    order = sorted(totals, key=lambda a: (-totals[a], key(best_of[a])))
    winner = order[0]
    shares = {a: (totals[a] / total if total > 0 else 1.0 / len(totals)) for a in order}
    margin = shares[winner] - (shares[order[1]] if len(order) > 1 else 0.0)
    # The returned candidate: the best member of the winning group, masked out or not (the
    # filter decides the vote, not which of the group's texts is the best).
    idx = min((i for i in range(n) if answers[i] == winner), key=key)
    return Outcome(winner, idx, shares, margin)


def prob_leader_wins(lead: int, second: int) -> float:
    """Adaptive-Consistency's Beta criterion: with a uniform prior, the posterior of the leading
    answer's share p among the top two is Beta(lead + 1, second + 1); this is P(p > 1/2),
    computed exactly for integer counts as P(Binomial(lead + second + 1, 1/2) <= lead)."""
    if lead < 0 or second < 0:
        raise ValueError("counts must be non-negative")
    n = lead + second + 1
    return float(sum(math.comb(n, k) for k in range(lead + 1)) / 2**n)


def all_differ(answers: Sequence[str | None], at_least: int) -> bool:
    """Whether at least ``at_least`` candidates are drawn (None: no usable answer) and no answer
    is shared by two of them: a vote among them is a coin toss, and for a weak model more
    samples rarely settle it (README, "Selection": on such items the most confident answer does
    about as well as the vote over 8)."""
    given = [a for a in answers if a is not None]
    return len(answers) >= at_least and len(set(given)) == len(given)


def should_stop(answers: Sequence[str | None], threshold: float = 0.95, *, min_votes: int = 2) -> bool:
    """Whether sampling may stop: at least ``min_votes`` answers and P(leader beats runner-up)
    >= ``threshold``."""
    counts = sorted(tally(answers, [1.0] * len(answers)).values(), reverse=True)
    if not counts or sum(counts) < min_votes:
        return False
    lead = int(counts[0])
    second = int(counts[1]) if len(counts) > 1 else 0
    return prob_leader_wins(lead, second) >= threshold
