"""The shared selection policy: weighted answer-group votes (strategies/selection.py)."""

from __future__ import annotations

import pytest

from strategies.answers import FORM_OK, FORM_PLACEHOLDER, FORM_TRUNCATED
from strategies.selection import Ballot, WeightedVote


def _b(answer: str | None, conf: float | None, form: int = FORM_OK, **more: float) -> Ballot:
    return Ballot(answer, form, {"confidence": conf, **more})


def test_plain_majority_when_temperature_is_none() -> None:
    c = WeightedVote(temperature=None).choose([_b("4", 0.1), _b("5", 0.9), _b("4", 0.2)])
    assert c.answer == "4" and c.order[0] == 2  # the better of the two "4"s
    assert c.agreement == pytest.approx(2 / 3)
    assert sorted(c.order) == [0, 1, 2]


def test_confidence_weighting_can_overturn_a_thin_majority() -> None:
    ballots = [_b("4", 0.1), _b("4", 0.1), _b("5", 0.9)]
    assert WeightedVote(temperature=0.1).choose(ballots).answer == "5"
    assert WeightedVote(temperature=10.0).choose(ballots).answer == "4"  # hot: close to majority


def test_order_is_by_group_then_quality() -> None:
    c = WeightedVote(temperature=None).choose([_b("5", 0.9), _b("4", 0.2), _b("4", 0.8), _b(None, 1.0)])
    assert c.order == [2, 1, 0, 3]


def test_malformed_candidates_vote_only_when_nothing_else_does() -> None:
    ballots = [_b("x", 0.9, FORM_PLACEHOLDER), _b("x", 0.9, FORM_PLACEHOLDER), _b("7", 0.1)]
    assert WeightedVote(temperature=None).choose(ballots).answer == "7"
    only_truncated = [_b("3", 0.5, FORM_TRUNCATED), _b("3", 0.4, FORM_TRUNCATED)]
    assert WeightedVote(temperature=None).choose(only_truncated).answer == "3"


def test_deepconf_filter_drops_the_least_confident_first() -> None:
    ballots = [_b("4", 0.1), _b("4", 0.2), _b("4", 0.15), _b("5", 0.9), _b("5", 0.8)]
    assert WeightedVote(temperature=None).choose(ballots).answer == "4"
    assert WeightedVote(temperature=None, keep=0.4).choose(ballots).answer == "5"


def test_verifier_weights_combine_and_unweighted_names_are_ignored() -> None:
    p = WeightedVote(weights={"confidence": 1.0, "approval": 3.0})
    assert p.quality(_b("4", 0.2, approval=1.0)) == pytest.approx((0.2 + 3.0) / 4)
    assert p.quality(_b("4", None, approval=None)) is None
    assert WeightedVote(weights={"confidence": 1.0}).quality(_b("4", 0.5, other=1.0)) == 0.5


def test_every_candidate_abstaining() -> None:
    c = WeightedVote().choose([_b(None, 0.2), _b(None, 0.9)])
    assert c.answer is None and c.agreement == 0.0 and c.order == [1, 0]
    assert WeightedVote().choose([]).order == []


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"keep": 0.0}, {"keep": 1.5},
                                    {"weights": {"a": -1.0}}, {"weights": {"a": float("inf")}}])
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        WeightedVote(**kwargs)  # type: ignore[arg-type]
