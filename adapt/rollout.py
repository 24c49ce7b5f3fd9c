"""Adapter versions in the upstream: loaded, promoted, rolled back, unloaded once idle.

A version is loaded under its immutable name (for the gate, or at start-up to restore a route),
promoted by switching its tenant's route in the registry (new requests go to it at once; the
version it replaced is retired and unloaded when its last request ends), and rolled back to its
parent or the base, by hand or when ``LiveWatch`` sees its live confidence fall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from adapt.registry import AdapterRegistry, AdapterVersion
from adapt.watch import LiveWatch
from protocol.errors import NotFound, SharpenError, UpstreamStatusError
from protocol.upstream import AdapterHost

log = logging.getLogger(__name__)


class Rollout:
    """Loads, promotes, rolls back and unloads a service's adapter versions; owns the background
    unloads it starts (``close`` cancels them)."""

    def __init__(self, upstream: AdapterHost, registry: AdapterRegistry, watch: LiveWatch) -> None:
        self.upstream = upstream
        self.registry = registry
        self.watch = watch
        self.models_changed: Callable[[], Awaitable[None]] | None = None  # the proxy's model list, told at once
        self._tasks: set[asyncio.Future[Any]] = set()

    async def load(self, v: AdapterVersion) -> None:
        """Loads ``v`` into the upstream (loaded already is fine)."""
        try:
            await self.upstream.load_lora_adapter(v.name, v.path)  # absolute: vLLM needs it so
        except UpstreamStatusError as exc:
            if exc.http_status != 400 or "already" not in exc.message.lower():
                raise
        await self.refresh()

    async def refresh(self) -> None:
        """Lets the proxy's model list know at once (it otherwise refreshes on a miss)."""
        if self.models_changed is not None:
            try:
                await self.models_changed()
            except Exception:  # the list is a cache; the next miss refreshes it anyway
                log.exception("refreshing the model list failed")

    def promote(self, v: AdapterVersion) -> str | None:
        """Routes the tenant to ``v``; returns the adapter it replaced, if any (the caller unloads it)."""
        old = self.registry.activate(v)  # from here on, new requests go to v
        self.registry.update(v.name, status="active", promoted_at=time.time())
        self.watch.promoted(v.tenant, v.name, (self.registry.get(v.name) or v).score_new)
        log.info("adapter %s promoted (replaces %s)", v.name, old or "the base model")
        if old is None or old == v.name:
            return None
        self.registry.update(old, status="retired")
        return old

    async def rollback(self, tenant: str, base: str, reason: str) -> dict[str, Any]:
        """Routes ``tenant`` back to the previous version (or ``base``) and unloads the current one."""
        current = self.registry.active(tenant, base)
        if current is None:
            raise NotFound(f"Tenant '{tenant}' has no active adapter to roll back.")
        cur = self.registry.get(current)
        prev = self.registry.get(cur.parent) if cur is not None and cur.parent else None
        if prev is not None:
            await self.load(prev)
            self.registry.activate(prev)
            self.registry.update(prev.name, status="active")
        else:
            self.registry.deactivate(tenant, base)
        self.registry.update(current, status="rolled_back", note=reason)
        self.watch.forget(current)  # by hand too: no longer watched
        self.spawn(self.unload_when_idle(current))
        log.warning("adapter %s rolled back (%s); now serving %s", current, reason, prev.name if prev else base)
        return {"rolled_back": current, "now": prev.name if prev else base, "reason": reason}

    async def unload_when_idle(self, name: str, timeout: float = 120.0) -> None:
        """Unloads ``name`` once no request holds it (or after ``timeout``: a stuck client must not
        keep a version loaded for ever)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registry.idle(name), timeout)
        try:
            await self.upstream.unload_lora_adapter(name)
            await self.refresh()
        except SharpenError as exc:
            log.info("unloading %s: %s", name, exc.message)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Runs ``coro`` in the background until it ends or ``close``."""
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
