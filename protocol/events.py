"""An in-process event stream of finished requests (uncertainty and all), for consumers such
as the adaptation loop. Publishing never blocks a response: a slow subscriber loses its
oldest events, and the loss is counted."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from protocol.uncertainty import Uncertainty


@dataclass(frozen=True)
class Sample:
    """One candidate a strategy drew for the request (``answer``: its normalised final answer,
    or what its program printed when ``program``). Adaptation labels with the samples a request
    already paid for instead of drawing them again."""

    content: str
    answer: str | None
    finish_reason: str | None
    logprob: float | None  # mean token logprob
    program: bool = False


@dataclass
class RequestEvent:
    """One finished chat request, as the strategy engine saw it."""

    request_id: str
    tenant: str
    model: str
    strategy: str
    messages: list[dict[str, Any]]
    answer: str | None
    uncertainty: Uncertainty | None
    usage: dict[str, int]
    remember: bool = True  # the request allowed its answer to be remembered
    memory_used: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)  # the candidates drawn, when the strategy drew several
    at: float = field(default_factory=time.time)


class EventBus:
    """Fan-out to bounded subscriber queues."""

    def __init__(self, maxsize: int = 1000) -> None:
        self._maxsize = maxsize
        self._subs: list[asyncio.Queue[RequestEvent]] = []
        self.dropped = 0

    @property
    def active(self) -> bool:
        """Whether anyone listens (publishers skip building events otherwise)."""
        return bool(self._subs)

    def subscribe(self) -> asyncio.Queue[RequestEvent]:
        q: asyncio.Queue[RequestEvent] = asyncio.Queue(self._maxsize)
        self._subs.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[RequestEvent]) -> None:
        if q in self._subs:
            self._subs.remove(q)

    def publish(self, event: RequestEvent) -> None:
        for q in self._subs:
            if q.full():
                q.get_nowait()
                self.dropped += 1
            q.put_nowait(event)
