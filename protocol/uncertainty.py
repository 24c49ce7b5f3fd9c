"""How unsure a strategy was about its answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Uncertainty:
    """How unsure the model was; 0 is certain, 1 is a coin toss. None where not measured."""

    score: float
    agreement: float | None = None
    approval_margin: float | None = None
    logprob_margin: float | None = None
