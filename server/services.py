"""The services one app holds, built once from the settings."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request

from server.auth import Authenticator, Principal
from server.events import EventBus
from server.metrics import Metrics
from server.models import ModelRegistry
from server.service import ProxyService
from server.settings import Settings
from server.upstream import Upstream
from strategies import builtin_strategies
from strategies.registry import StrategyRegistry


class Services:
    """Everything a route needs, wired together; ``close`` releases what it holds."""

    _READY_TTL = 1.0  # /ready probes are cached briefly so a tight poll cannot load the upstream

    def __init__(self, settings: Settings, upstream: Upstream) -> None:
        self.settings = settings
        self.upstream = upstream
        self.metrics = Metrics()
        self.auth = Authenticator(settings)
        self.models = ModelRegistry(upstream)
        self.strategies = StrategyRegistry(builtin_strategies())
        self.events = EventBus()
        self.proxy = ProxyService(settings, upstream, self.models, self.strategies, self.metrics, self.events)
        self._ready: tuple[float, bool] = (0.0, False)

    def authenticate(self, request: Request) -> Principal:
        return self.auth.authenticate(request.headers.get("authorization"))

    async def upstream_ready(self) -> bool:
        at, ok = self._ready
        if time.monotonic() - at < self._READY_TTL:
            return ok
        ok = await self.upstream.healthy()
        self._ready = (time.monotonic(), ok)
        self.metrics.upstream_ready.set(1 if ok else 0)
        return ok

    def model_cards(self) -> list[dict[str, Any]]:
        """The upstream's models, then each one's ``model@strategy`` variants."""
        cards = self.models.cards()
        out = list(cards)
        for card in cards:
            for name in self.strategies.names():
                if name != "passthrough":
                    out.append({"id": f"{card['id']}@{name}", "object": "model", "created": card.get("created", 0),
                                "owned_by": "sharpen", "root": card.get("root", card["id"]), "parent": card["id"]})
        return out

    async def close(self) -> None:
        await self.upstream.aclose()
