"""``loadtest/program_deadline.py``: the time model's fit and the re-scored deadline."""

from __future__ import annotations

import pytest

from loadtest import program_deadline as pd
from loadtest import selection_rescore as R
from strategies.confidence import TokenStats, measure


def _c(answer: str | None, correct: int, tokens: int, lp: float = -0.2) -> R.Cand:
    conf = measure(TokenStats((lp,) * tokens, (0.4,) * tokens))
    return R.Cand(answer, 0 if answer is not None else 9, correct, conf, tokens)


def _rec(progs: list[R.Cand]) -> R.Rec:
    # eight short prose answers, wrong (5); the programs decide whether 7 (right) wins
    prose = [_c("5", 0, 8, -1.0) for _ in range(8)]
    return R.Rec("report:t:0", "report", "t", prose[0], prose, progs, 30, 60, {})


def test_fit_recovers_a_line() -> None:
    f, t = pd.fit([(8, 0.2 + 8 * 0.1), (64, 0.2 + 64 * 0.1), (256, 0.2 + 256 * 0.1)])
    assert f == pytest.approx(0.2) and t == pytest.approx(0.1)


def test_a_deadline_drops_the_programs_still_running() -> None:
    # three quick programs print 7, one rambles for 300 tokens
    r = _rec([_c("7", 1, 10), _c("7", 1, 12), _c("7", 1, 14), _c("8", 0, 300)])
    right, cut, ratio = pd.simulate(r, None, "none", 0.2, 0.1, 0.2, 0.1)
    assert (right, cut) == (1, False) and ratio == pytest.approx((0.2 + 30.0) / (0.2 + 0.8))
    # cancelling the program call at 2x the prose call loses all four, and the answer
    right, cut, ratio = pd.simulate(r, 2.0, "whole", 0.2, 0.1, 0.2, 0.1)
    assert (right, cut) == (0, True) and ratio == pytest.approx(2.0)
    # keeping those already finished (10-14 tokens: 1.2-1.6 s against a 2 s deadline) keeps the answer
    right, cut, _ = pd.simulate(r, 2.0, "finished", 0.2, 0.1, 0.2, 0.1)
    assert (right, cut) == (1, True)


def test_the_table_counts_right_answers_and_cuts_per_family() -> None:
    recs = [_rec([_c("7", 1, 10)] * 4), _rec([_c("7", 1, 100)] * 4)]
    out = pd.table(recs, [2.0], 0.2, 0.1, 0.2, 0.1)
    rows = out.splitlines()
    assert rows[2].startswith("| none (waits for every program) | 2 right, 0 cut")
    assert rows[3].startswith("| 2.0x the prose call, whole | 1 right, 1 cut")
    assert rows[4].startswith("| 2.0x the prose call, finished | 1 right, 1 cut")


def test_the_deadline_waits_until_a_program_answered_unless_a_ceiling_says_otherwise() -> None:
    # the quick program (1.2 s against a 2 s deadline) prints nothing; the slow ones print 7 at 30 s
    r = _rec([_c(None, 0, 10), _c("7", 1, 300), _c("7", 1, 300), _c("7", 1, 300)])
    right, cut, ratio = pd.simulate(r, 2.0, "finished", 0.2, 0.1, 0.2, 0.1, answered=1)
    assert (right, cut) == (1, False) and ratio == pytest.approx((0.2 + 30.0) / (0.2 + 0.8))
    right, cut, ratio = pd.simulate(r, 2.0, "finished", 0.2, 0.1, 0.2, 0.1, answered=1, ceiling=5.0)
    assert (right, cut) == (0, True) and ratio == pytest.approx(5.0)
    # a quick program that answered: cut at 2x, its answer kept
    r = _rec([_c("7", 1, 10), _c("8", 0, 300), _c("8", 0, 300), _c("8", 0, 300)])
    right, cut, ratio = pd.simulate(r, 2.0, "finished", 0.2, 0.1, 0.2, 0.1, answered=1, ceiling=5.0)
    assert (right, cut) == (1, True) and ratio == pytest.approx(2.0)
