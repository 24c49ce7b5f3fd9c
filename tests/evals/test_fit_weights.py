"""Fitting per-verifier weights and the vote temperature (evals/fit_weights.py)."""

from __future__ import annotations

import random

from evals.fit_weights import Scored, combined, fit, fit_weights, pseudo_labels, select


def _items(seed: int = 0, n_items: int = 60) -> list[list[Scored]]:
    """Items of 6 candidates: "good" scores right ones higher, "noise" is random, "anti" is
    inverted. The right answer is "r"; wrong ones scatter, so a plain vote is often wrong."""
    rng = random.Random(seed)
    items = []
    for _ in range(n_items):
        it = []
        for _ in range(6):
            right = rng.random() < 0.35
            ans = "r" if right else rng.choice(["w1", "w1", "w2", "w3"])
            good = (0.7 if right else 0.3) + rng.gauss(0, 0.1)
            it.append(Scored({"good": good, "noise": rng.random(), "anti": 1 - good}, ans, right))
        items.append(it)
    return items


def test_a_verifier_with_signal_gets_weight_noise_and_inverted_get_about_none() -> None:
    w = fit_weights(_items(), ["good", "noise", "anti"])
    assert w["good"] > 1.0
    assert w["noise"] < 0.2 * w["good"]
    assert w["anti"] == 0.0  # clipped: a verifier never counts against what it approves


def test_weighted_vote_beats_majority_when_a_verifier_has_signal() -> None:
    items = _items(1, 120)
    f = fit(items, ["good", "noise"])
    assert f.accuracy > f.majority_accuracy + 0.05
    assert f.items == 120 and f.temperature > 0


def test_no_labels_variation_gives_zero_weights() -> None:
    items = [[Scored({"a": 0.5}, "x", True), Scored({"a": 0.9}, "x", True)]]
    assert fit_weights(items, ["a"]) == {"a": 0.0}
    assert fit_weights([], ["a"]) == {"a": 0.0}


def test_missing_scores_are_tolerated() -> None:
    items = [[Scored({"a": None}, "x", True), Scored({"a": 0.1}, "y", False), Scored({"a": 0.9}, "x", True)]]
    w = fit_weights(items, ["a"])
    assert w["a"] >= 0
    assert combined(Scored({"a": None}, "x", True), w) is None
    assert select(items[0], w, 0.1) in (0, 2)


def test_pseudo_labels_follow_the_majority() -> None:
    items = [[Scored({}, "4", False), Scored({}, "4", False), Scored({}, "5", True), Scored({}, None, False)]]
    labels = [c.correct for c in pseudo_labels(items)[0]]
    assert labels == [True, True, False, False]
