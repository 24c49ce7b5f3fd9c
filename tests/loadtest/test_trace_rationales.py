"""``loadtest/trace_rationales.py``: the programs' own majority as the label."""

from __future__ import annotations

from loadtest.trace_rationales import majority


def test_majority_needs_two_votes_and_more_than_half() -> None:
    assert majority(["42", "42", "7", None]) == "42"
    assert majority(["42", "7", None, None]) is None
    assert majority(["42", "42", "7", "7"]) is None
    assert majority([None, None]) is None
