"""Answer-group voting, CISC, DeepConf's filter, Borda and the Beta stopping rule (strategies/vote.py)."""

from __future__ import annotations

import math

import pytest

from strategies.vote import (
    all_differ,
    keep_top,
    prob_leader_wins,
    should_stop,
    tally,
    vote,
    weights_borda,
    weights_softmax,
    weights_uniform,
)


def test_majority_vote_over_groups() -> None:
    out = vote(["4", "5", "4", None], weights_uniform(4))
    assert out.answer == "4"
    assert out.shares == pytest.approx({"4": 2 / 3, "5": 1 / 3})
    assert out.margin == pytest.approx(1 / 3)
    assert out.index == 0


def test_weights_can_overturn_the_majority() -> None:
    # two unsure candidates say 4, one very sure says 5
    out = vote(["4", "4", "5"], [0.1, 0.1, 0.8])
    assert out.answer == "5" and out.index == 2


def test_the_best_member_of_the_winning_group_is_returned() -> None:
    out = vote(["4", "4", "5"], weights_uniform(3), quality=[0.2, 0.9, 1.0])
    assert out.answer == "4" and out.index == 1
    # well-formedness first: a truncated member is returned only when no finished one shares the answer
    out = vote(["4", "4"], weights_uniform(2), quality=[0.9, 0.1], rank=[1, 0])
    assert out.index == 1


def test_a_tie_goes_to_the_group_with_the_better_candidate() -> None:
    out = vote(["4", "5"], weights_uniform(2), quality=[0.1, 0.7])
    assert out.answer == "5"
    out = vote(["4", "5"], weights_uniform(2), quality=[0.9, 0.7])
    assert out.answer == "4"


def test_everyone_abstains() -> None:
    out = vote([None, None], weights_uniform(2), quality=[0.1, 0.5])
    assert out.answer is None and out.index == 1 and out.shares == {}
    assert vote([], []).index is None


def test_mask_keeps_the_filtered_out_from_voting() -> None:
    out = vote(["4", "4", "5"], weights_uniform(3), mask=[False, False, True])
    assert out.answer == "5"
    assert tally(["4", "5"], [1.0, 2.0], [True, False]) == {"4": 1.0}
    with pytest.raises(ValueError):
        tally(["4"], [1.0, 2.0])


def test_softmax_weights_cisc() -> None:
    w = weights_softmax([0.0, math.log(3)], temperature=1.0)
    assert w == pytest.approx([0.25, 0.75])
    assert sum(weights_softmax([1.0, 2.0, 3.0], 0.5)) == pytest.approx(1.0)
    # high temperature tends to uniform, low to one-hot
    assert weights_softmax([1.0, 2.0], 1000.0) == pytest.approx([0.5, 0.5], abs=1e-3)
    assert weights_softmax([1.0, 2.0], 0.01)[1] == pytest.approx(1.0)
    assert weights_softmax([None, 1.0], 1.0) == [0.0, 1.0]
    assert weights_softmax([None, None], 1.0) == [1.0, 1.0]
    with pytest.raises(ValueError):
        weights_softmax([1.0], 0)


def test_keep_top_drops_the_least_confident_share() -> None:
    assert keep_top([0.1, 0.9, 0.5, 0.7], keep=0.5) == [False, True, False, True]
    assert keep_top([0.1, 0.9, 0.5, 0.7], keep=0.1) == [False, True, False, False]  # at least one
    assert keep_top([0.5, 0.5, 0.1], keep=0.34) == [True, True, False]  # ties at the cut are kept
    assert keep_top([None, 0.2, 0.3], keep=0.67) == [False, True, True]  # no score goes first
    assert keep_top([None, None], keep=0.5) == [True, True]
    assert keep_top([], keep=0.5) == []
    with pytest.raises(ValueError):
        keep_top([1.0], keep=0)


def test_borda_weights() -> None:
    assert weights_borda([0.3, 0.9, 0.1]) == [2.0, 3.0, 1.0]
    assert weights_borda([0.3, 0.3, 0.1]) == [3.0, 3.0, 1.0]  # ties share the better rank
    assert weights_borda([None, 0.5], power=2) == [1.0, 4.0]


def test_prob_leader_wins_is_the_beta_tail() -> None:
    assert prob_leader_wins(0, 0) == pytest.approx(0.5)
    assert prob_leader_wins(1, 0) == pytest.approx(0.75)  # Beta(2,1): P(p > 1/2) = 3/4
    assert prob_leader_wins(3, 3) == pytest.approx(0.5)
    # numerically against the Beta density integrated on a grid
    a, b = 5 + 1, 2 + 1
    grid = 20000
    dens = [((i + 0.5) / grid) ** (a - 1) * (1 - (i + 0.5) / grid) ** (b - 1) for i in range(grid)]
    tail = sum(dens[grid // 2:]) / sum(dens)
    assert prob_leader_wins(5, 2) == pytest.approx(tail, abs=1e-4)
    with pytest.raises(ValueError):
        prob_leader_wins(-1, 0)


def test_should_stop() -> None:
    assert not should_stop(["4"], 0.95)  # one vote is never settled
    assert not should_stop(["4", "4", "4"], 0.95)  # P = 15/16 = 0.9375
    assert should_stop(["4", "4", "4", "4"], 0.95)  # P = 31/32
    assert not should_stop(["4", "4", "4", "4", "5", "5"], 0.95)
    assert should_stop(["4", "4", "4", "4"], 0.95, min_votes=2)
    assert not should_stop([None, None, None, None], 0.5)


def test_all_differ_needs_enough_candidates_and_no_shared_answer() -> None:
    assert all_differ(["3", "5", "7"], 3)
    assert not all_differ(["3", "5"], 3)  # too few drawn yet
    assert not all_differ(["3", "5", "3"], 3)  # two agree: the vote means something
    assert all_differ(["3", None, "7"], 3)  # a candidate with no usable answer counts as drawn, not as a vote
    assert all_differ([None, None, None], 3)
    assert not all_differ(["3", None, "3", None], 3)
