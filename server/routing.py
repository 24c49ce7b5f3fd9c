"""Where one request goes besides its strategy: the memories replayed into it and the adapter
that answers it. Built by the proxy before the strategy runs; the strategy never sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol.wire import task_of
from server.series import Counter

if TYPE_CHECKING:
    from adapt.service import AdaptationService


@dataclass
class Routing:
    """Server-side facts about one request (typed, so nothing internal leaks into the trace).

    ``memory`` is None when nothing was recalled (memory off for the request), else the
    experiences replayed (possibly none); ``acquired`` is the model taken from the adaptation
    service, released when the request ends; ``adapter`` is set when a tenant's adapter, not the
    base model, answers; ``scope`` says how near the question was to the adapter's (``adapt.scope``).
    """

    remember: bool = False
    memory: list[dict[str, Any]] | None = None
    acquired: str | None = None
    adapter: str | None = None
    scope: dict[str, Any] | None = None  # the adapter scope's verdict, when it gave one

    def memory_ids(self) -> list[str]:
        return [str(m["id"]) for m in self.memory or []]


async def acquire_model(adapt: AdaptationService, tenant: str, model: str, body: dict[str, Any],
                        routing: Routing, counter: Counter) -> str:
    """The model that answers the request (the tenant's adapter or ``model``), counted in flight
    in ``routing.acquired``. With ``adapt.scope: near`` and an active adapter the question is
    embedded first (adapt/scope.py; no one else pays for that), and ``counter`` counts who answered."""
    vec = None
    if adapt.scope.needs(tenant, model):
        messages, prompt = body.get("messages"), body.get("prompt")
        question = task_of(messages) if isinstance(messages, list) else prompt if isinstance(prompt, str) else ""
        vec = await adapt.scope.embed(question, tenant, model) if question else None
    route = adapt.scope.acquire(tenant, model, vec)
    routing.acquired = route.model
    if route.similarity is not None and route.threshold is not None:
        by = "adapter" if routing.acquired != model else "base"
        routing.scope = {"similarity": round(route.similarity, 4), "threshold": round(route.threshold, 4),
                         "answered_by": by}
        counter.labels(by).inc()
    return routing.acquired
