"""The verifier interface: score every candidate of one request.

Contract: ``score`` returns one ``Verdict`` per candidate, in order. A verdict whose call failed
carries ``error`` and no score; the aggregator then scores that candidate by the remaining
verifiers. Verifiers that call the upstream do so through ``ctx`` (usage stays honest) and
should issue their calls concurrently.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protocol.wire import text_of
from strategies.base import Candidate, StrategyContext


@dataclass
class Verdict:
    """One verifier's judgement of one candidate. ``score`` is in [0, 1] (1 = approve)."""

    score: float | None
    approved: bool | None = None
    soft: bool = False  # True when the score came from the verdict token's probability
    detail: str | None = None
    error: str | None = None


@dataclass
class VerificationTask:
    """What verifiers see: the conversation, the candidates, and the request's constraints."""

    messages: list[dict[str, Any]]
    candidates: list[Candidate]
    response_format: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The conversation as plain text, last user turn last."""
        parts = []
        for m in self.messages:
            content = text_of(m.get("content"))
            if content:
                parts.append(f"{m.get('role', 'user')}: {content}" if len(self.messages) > 1 else str(content))
        return "\n".join(parts)


class Verifier(abc.ABC):
    """Scores candidates; ``calls_per_candidate`` counts upstream calls (0 = programmatic)."""

    name: ClassVar[str]
    calls_per_candidate: ClassVar[int] = 0

    @abc.abstractmethod
    async def score(self, task: VerificationTask, ctx: StrategyContext) -> list[Verdict]:
        """One verdict per candidate, in order."""
