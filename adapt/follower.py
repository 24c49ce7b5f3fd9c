"""The adaptation service of a replica sharpen process (see ``server.ownership``).

Another process, the primary, owns the data folder: it queues, trains, gates, promotes, loads
and unloads adapters, and writes the routes into the registry. A replica does none of that: it
re-reads the routes every ``follow_s`` seconds (so its tenants reach the adapters the primary
promoted, already loaded in vLLM by the primary), and refuses every write with ``not_primary``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from adapt.data import Example
from adapt.job import Job
from adapt.service import AdaptationService
from protocol.errors import ServiceUnavailable

log = logging.getLogger(__name__)


class ReplicaAdaptation(AdaptationService):
    """Follows the primary's adapter routes; starts no cycle and loads nothing."""

    def __init__(self, *args: Any, follow_s: float, not_primary: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.follow_s = follow_s
        self.not_primary = not_primary

    async def start(self, base: str | None) -> None:
        self.base = base
        self.registry.reload_routes()
        self.scope.preload()  # a replica routes by the scope too: its first request should not load a model
        self._tasks = [asyncio.create_task(self._follow())]

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.follow_s)
            try:
                if await loop.run_in_executor(self._pool, self.registry.reload_routes):
                    await self.rollout.refresh()
            except Exception:
                log.exception("re-reading the adapter routes failed")

    def _refuse(self) -> ServiceUnavailable:
        return ServiceUnavailable(self.not_primary, code="not_primary")

    def run_cycle(self, tenant: str, *, examples: list[Example] | None = None,
                  heldout: list[Example] | None = None) -> Job:
        raise self._refuse()

    async def cancel(self, job_id: str) -> None:
        raise self._refuse()

    async def rollback(self, tenant: str, reason: str = "by hand") -> dict[str, Any]:
        raise self._refuse()

    def status(self) -> dict[str, Any]:
        return {**super().status(), "role": "replica"}
