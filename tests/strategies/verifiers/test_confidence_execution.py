"""The confidence and execution verifiers (strategies/verifiers/confidence.py, execution.py)."""

from __future__ import annotations

import math

import pytest

from strategies.base import Candidate
from strategies.confidence import TokenStats, measure
from strategies.verifiers.base import VerificationTask
from strategies.verifiers.confidence import ConfidenceVerifier, to_unit
from strategies.verifiers.execution import ExecutionAgreement
from tests.fakes.transport import offline_context


def _cand(i: int, answer: str | None, lps: tuple[float, ...] | None) -> Candidate:
    conf = measure(TokenStats(lps, tuple(-x for x in lps))) if lps is not None else None
    return Candidate(index=i, content=f"The answer is {answer}.", answer=answer, confidence=conf)


async def test_confidence_scores_follow_the_mean_logprob() -> None:
    cands = [_cand(0, "4", (-0.1, -0.1)), _cand(1, "5", (-1.0, -2.0)), _cand(2, "6", None)]
    task = VerificationTask(messages=[{"role": "user", "content": "q"}], candidates=cands)
    v = await ConfidenceVerifier().score(task, offline_context())
    assert v[0].score == pytest.approx(math.exp(-0.1))
    assert v[1].score == pytest.approx(math.exp(-1.5))
    assert v[2].score is None and v[2].error  # no logprobs: no score, not zero
    assert ConfidenceVerifier.calls_per_candidate == 0


async def test_other_signals_map_into_the_unit_interval() -> None:
    cands = [_cand(0, "4", (-0.1, -3.0)), _cand(1, "5", (-2.0, -2.0))]
    task = VerificationTask(messages=[], candidates=cands)
    v = await ConfidenceVerifier("lowest_group").score(task, offline_context())
    assert all(0 <= (d.score or 0) <= 1 for d in v)
    assert to_unit("tail", 0.0) == 0.0 and to_unit("tail", 50.0) == pytest.approx(1.0)
    assert to_unit("mean_logprob", 0.5) == 1.0
    with pytest.raises(ValueError):
        ConfidenceVerifier("nope")


async def test_execution_agreement() -> None:
    cands = [_cand(0, "4", None), _cand(1, "5", None), _cand(2, None, None)]
    task = VerificationTask(messages=[], candidates=cands, options={"executed": ["4", "4", "7", None]})
    v = await ExecutionAgreement().score(task, offline_context())
    assert [d.score for d in v] == pytest.approx([2 / 3, 0.0, 0.0])
    assert v[0].approved and not v[1].approved


async def test_no_successful_run_means_every_verdict_abstains() -> None:
    cands = [_cand(0, "4", None)]
    for executed in (None, [], [None, None]):
        task = VerificationTask(messages=[], candidates=cands, options={"executed": executed})
        v = await ExecutionAgreement().score(task, offline_context())
        assert v[0].score is None and v[0].error is None
