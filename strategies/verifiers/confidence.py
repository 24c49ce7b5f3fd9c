"""The model's own confidence as a verifier: no upstream calls, from the candidates' token logprobs.

The score is a probability-like number in [0, 1] from one signal of ``strategies.confidence``:
``mean_logprob`` becomes the geometric-mean token probability ``exp(mean logprob)``; the
DeepConf signals (``mean_conf``, ``lowest_group``, ``tail``: minus mean top-k logprobs, >= 0)
become ``1 - exp(-x)``. A candidate without logprobs gets no score (the vote then leans on the
others). Which signal is the default was measured (``loadtest/selection_bench.py``).
"""

from __future__ import annotations

import math

from strategies.base import StrategyContext
from strategies.confidence import SIGNALS, Confidence
from strategies.verifiers.base import Verdict, VerificationTask, Verifier

DEFAULT_SIGNAL = "mean_logprob"


def to_unit(signal: str, value: float) -> float:
    """A signal's value mapped monotonically into [0, 1]."""
    if signal == "mean_logprob":
        return math.exp(min(value, 0.0))
    return 1.0 - math.exp(-max(value, 0.0))


class ConfidenceVerifier(Verifier):
    """Scores each candidate by its ``signal`` (see the module docstring)."""

    name = "confidence"

    def __init__(self, signal: str = DEFAULT_SIGNAL) -> None:
        if signal not in SIGNALS:
            raise ValueError(f"unknown confidence signal {signal!r}; valid: {', '.join(SIGNALS)}")
        self.signal = signal

    def verdict(self, conf: Confidence | None) -> Verdict:
        value = conf.get(self.signal) if conf is not None else None
        if value is None:
            return Verdict(None, error="no token logprobs for this candidate")
        s = to_unit(self.signal, value)
        return Verdict(s, approved=None, soft=True, detail=f"{self.signal}={value:.3f}")

    async def score(self, task: VerificationTask, ctx: StrategyContext) -> list[Verdict]:
        return [self.verdict(c.confidence) for c in task.candidates]
