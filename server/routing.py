"""Where one request goes besides its strategy: the memories replayed into it and the adapter
that answers it. Built by the proxy before the strategy runs; the strategy never sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Routing:
    """Server-side facts about one request (typed, so nothing internal leaks into the trace).

    ``memory`` is None when nothing was recalled (memory off for the request), else the
    experiences replayed (possibly none); ``acquired`` is the model taken from the adaptation
    service, released when the request ends; ``adapter`` is set when a tenant's adapter, not the
    base model, answers.
    """

    remember: bool = False
    memory: list[dict[str, Any]] | None = None
    acquired: str | None = None
    adapter: str | None = None

    def memory_ids(self) -> list[str]:
        return [str(m["id"]) for m in self.memory or []]
