"""One upstream replica of a pool, and the small pieces the pool is made of: URLs fit to show,
the prompt-prefix key that affinity hashes, and a reply that counts as in flight until consumed."""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.redact import redact_url
from server.settings import UpstreamSettings
from server.transport import Transport
from server.upstream import Upstream, UpstreamReply

log = logging.getLogger(__name__)


def unique_urls(urls: list[str]) -> list[str]:
    """The URLs in order without repeats (each repeat logged: a typo more often than intent)."""
    out: list[str] = []
    for url in urls:
        u = url.rstrip("/")
        if u in out:
            log.warning("upstream %s is listed more than once; using it once", redact_url(u))
        else:
            out.append(u)
    return out


def prefix_key(body: dict[str, Any]) -> int:
    """A hash of the prompt's start: the first message (a system prompt, usually) or the prompt."""
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
        head = str(msgs[0].get("content"))
    else:
        head = str(body.get("prompt"))
    return zlib.crc32(head[:2048].encode("utf-8", "replace"))


class Replica:
    """One upstream server of the pool, and what the pool knows about it."""

    def __init__(self, url: str, settings: UpstreamSettings, transport: Transport | None = None) -> None:
        # the pool retries across replicas itself: each replica's client tries once
        self.upstream = Upstream(url, settings.model_copy(update={"retries": 0}), transport)
        self.label = redact_url(self.upstream.base_url)
        self._seed = self.label.encode()
        self.up = False
        self.checked = False  # answered or failed at least one check
        self.in_flight = 0
        self.failures = 0
        self.retry_at = 0.0
        self.last_check = 0.0
        self.error = ""
        self.adapters: set[str] = set()  # adapters it is known to hold

    def score(self, key: int) -> int:
        return zlib.crc32(self._seed, key)  # rendezvous hashing: the highest score wins the key


class PoolReply(UpstreamReply):
    """A replica's reply that counts as in flight on it until it is read or closed (``release``)."""

    def __init__(self, inner: UpstreamReply, release: Callable[[], None]) -> None:
        self._inner, self._release = inner, release
        self.status = inner.status
        self.headers = inner.headers
        self._done = False

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._release()

    async def read(self) -> bytes:
        try:
            return await self._inner.read()
        finally:
            self._finish()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner.chunks():
                yield chunk
        finally:
            self._finish()

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            self._finish()
