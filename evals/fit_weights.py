"""Per-verifier weights and the vote temperature, fitted from labelled candidates.

Each training item is a list of candidates; a candidate has a score per verifier (None where the
verifier gave none), its normalised answer and whether it was right. The fit:

1. weights: a logistic regression of "this candidate is right" on the verifier scores (missing
   scores filled with that verifier's mean, features standardised, L2-regularised, plain
   gradient descent), coefficients mapped back to raw score units and clipped at 0; a verifier
   with no signal gets about zero weight (Weaver, arXiv 2506.18203, combines weak verifiers with
   weights estimated from data in the same spirit).
2. temperature: the candidates' combined score ``sum_v w_v * s_v`` becomes a CISC softmax weight
   in an answer-group vote; the temperature that selects most right answers on the training
   items wins (ties: the higher, i.e. the closer to plain majority).

Without labels (``pseudo_labels``), the majority answer of each item stands in for the truth: a
verifier that agrees with the crowd gets weight, one that does not gets none. Pure: numpy-free,
imports nothing from the server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from strategies.vote import vote, weights_softmax

TEMPERATURES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Scored:
    """One candidate for fitting."""

    scores: dict[str, float | None]
    answer: str | None
    correct: bool


@dataclass(frozen=True)
class Fit:
    """The fitted weights (verifier -> weight >= 0), the vote temperature, and the training
    accuracy of the weighted vote and of plain majority on the same items."""

    weights: dict[str, float]
    temperature: float
    accuracy: float
    majority_accuracy: float
    items: int


def _logistic(xs: list[list[float]], ys: list[float], l2: float, steps: int, lr: float) -> list[float]:
    """Coefficients (bias last) of an L2-regularised logistic regression by gradient descent."""
    d = len(xs[0]) if xs else 0
    w = [0.0] * (d + 1)
    n = len(xs)
    for _ in range(steps):
        grad = [0.0] * (d + 1)
        for x, y in zip(xs, ys, strict=True):
            z = w[d] + sum(wi * xi for wi, xi in zip(w, x, strict=False))
            p = 1 / (1 + math.exp(-max(min(z, 30.0), -30.0)))
            e = p - y
            for j in range(d):
                grad[j] += e * x[j]
            grad[d] += e
        for j in range(d):
            w[j] -= lr * (grad[j] / n + l2 * w[j])
        w[d] -= lr * grad[d] / n
    return w


def fit_weights(items: Sequence[Sequence[Scored]], names: Sequence[str], *, l2: float = 0.01,
                steps: int = 400, lr: float = 0.5) -> dict[str, float]:
    """Non-negative weights per verifier in raw score units (see the module docstring)."""
    cands = [c for it in items for c in it]
    if not cands:
        return {v: 0.0 for v in names}
    means, sds = {}, {}
    for v in names:
        vals = [s for c in cands if (s := c.scores.get(v)) is not None]
        m = sum(vals) / len(vals) if vals else 0.0
        sd = math.sqrt(sum((x - m) ** 2 for x in vals) / len(vals)) if vals else 0.0
        means[v], sds[v] = m, sd
    xs = []
    for c in cands:
        row = []
        for v in names:
            s = c.scores.get(v)
            row.append(0.0 if s is None or sds[v] == 0 else (s - means[v]) / sds[v])
        xs.append(row)
    ys = [1.0 if c.correct else 0.0 for c in cands]
    if len(set(ys)) < 2:  # all right or all wrong: nothing tells the verifiers apart
        return {v: 0.0 for v in names}
    coef = _logistic(xs, ys, l2, steps, lr)
    return {v: (max(0.0, coef[j]) / sds[v] if sds[v] > 0 else 0.0) for j, v in enumerate(names)}


def combined(c: Scored, weights: dict[str, float]) -> float | None:
    """The candidate's weighted score; None when no weighted verifier scored it."""
    parts = [w * s for v, w in weights.items() if w > 0 and (s := c.scores.get(v)) is not None]
    return sum(parts) if parts else None


def select(item: Sequence[Scored], weights: dict[str, float], temperature: float) -> int | None:
    """The index the weighted answer-group vote returns."""
    q = [combined(c, weights) for c in item]
    return vote([c.answer for c in item], weights_softmax(q, temperature), quality=q).index


def _accuracy(items: Sequence[Sequence[Scored]], weights: dict[str, float], temperature: float) -> float:
    hits = 0
    for it in items:
        i = select(it, weights, temperature)
        hits += bool(i is not None and it[i].answer is not None and it[i].correct)
    return hits / len(items) if items else 0.0


def pseudo_labels(items: Sequence[Sequence[Scored]]) -> list[list[Scored]]:
    """Unlabelled items: each candidate marked right when it shares the item's majority answer."""
    out = []
    for it in items:
        counts: dict[str, int] = {}
        for c in it:
            if c.answer is not None:
                counts[c.answer] = counts.get(c.answer, 0) + 1
        top = max(counts, key=lambda a: counts[a]) if counts else None
        out.append([Scored(c.scores, c.answer, c.answer is not None and c.answer == top) for c in it])
    return out


def fit(items: Sequence[Sequence[Scored]], names: Sequence[str],
        temperatures: Sequence[float] = TEMPERATURES) -> Fit:
    """Weights, then the temperature that selects best with them."""
    weights = fit_weights(items, names)
    best_t, best_acc = temperatures[-1], -1.0
    for t in sorted(temperatures, reverse=True):  # ties keep the higher temperature
        acc = _accuracy(items, weights, t)
        if acc > best_acc + 1e-12:
            best_t, best_acc = t, acc
    uniform = {v: 0.0 for v in names}
    return Fit(weights, best_t, best_acc, _accuracy(items, uniform, 1.0), len(items))
