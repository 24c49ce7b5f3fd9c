"""An answer received by ``server.h1``: its head, and its body buffered as it arrives.

The connection feeds it (``feed``, ``finish``, ``fail``); the reader takes what has arrived
(``read_chunk``, ``read_buffered``) or waits for the end (``read``). A slow reader pauses the
socket once ``_HIGH_WATER`` bytes wait; a wait for the upstream is bounded by one timer per
answer (``bound_waits``); an answer read to its end gives its connection back for reuse, one
abandoned drops it (the upstream then stops the work).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from protocol.errors import UpstreamError
from server.transport import TransportResponse

_HIGH_WATER = 1 << 20  # bytes buffered for a slow reader before the socket stops being read


class Headers(dict[str, str]):
    """Response headers, keys lower-cased; lookups by any case (as aiohttp's and httpx's)."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class Link(Protocol):
    """What an answer needs of its connection."""

    transport: asyncio.Transport | None

    def done(self, reuse: bool) -> None:
        """The answer is finished with: read to its end (``reuse``) or abandoned."""


class H1Response(TransportResponse):
    """An answer whose head has arrived; its body is buffered as it comes."""

    def __init__(self, conn: Link, status: int, headers: Headers, *, until_close: bool) -> None:
        self._conn: Link | None = conn
        self.status = status
        self.headers = headers
        self.content_type = headers.get("content-type") or ""
        self.until_close = until_close
        self.done = False
        self._parts: deque[bytes] = deque()
        self._size = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._reading_all = False
        self._idle: float | None = None  # bound_waits: most seconds one wait for the upstream may last
        self._waiting_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- fed by the connection ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and not self._paused and not self._reading_all and self._conn is not None:
            assert self._conn.transport is not None
            self._conn.transport.pause_reading()
            self._paused = True
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: UpstreamError) -> None:
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        if self._paused and self._conn is not None and self._conn.transport is not None:
            self._conn.transport.resume_reading()
            self._paused = False
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        if self._idle is not None:
            self._waiting_since = loop.time()
            if self._timer is None:
                self._timer = loop.call_at(self._waiting_since + self._idle, self._check_idle)
        try:
            await self._waiter
        except BaseException:
            self._drop()  # abandoned mid-body (cancelled, timed out): the upstream must stop
            raise
        finally:
            self._waiter = None
            self._waiting_since = None

    def _check_idle(self) -> None:
        """One timer per response, not one per wait: when it fires it fails a wait that has
        lasted ``_idle`` seconds, or re-arms for the wait in progress, or lapses until the next."""
        self._timer = None
        since, idle, waiter = self._waiting_since, self._idle, self._waiter
        if since is None or idle is None or waiter is None or waiter.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= since + idle:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(since + idle, self._check_idle)

    # -- TransportResponse --------------------------------------------------------------------

    async def read(self) -> bytes:
        self._reading_all = True
        while not self.done:
            if self._error is not None:
                self._drop()
                raise self._error
            await self._wait()
        body = self._take()
        self._release()
        return body

    async def read_chunk(self) -> bytes:
        while True:
            if self._parts:
                return self._take()
            if self.done:
                self._release()
                return b""
            if self._error is not None:
                self._drop()
                raise self._error
            await self._wait()

    def read_buffered(self) -> bytes:
        return self._take() if self._parts else b""

    def bound_waits(self, idle: float) -> bool:
        self._idle = idle
        return True

    async def close(self) -> None:
        if self._conn is None:
            return
        if self.done and not self._parts:
            self._release()
        else:
            self._drop()

    # -- internals ---------------------------------------------------------------------------

    def _take(self) -> bytes:
        parts = self._parts
        data = parts.popleft() if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self._size = 0
        if self._paused and self._conn is not None and self._conn.transport is not None:
            self._conn.transport.resume_reading()
            self._paused = False
        return data

    def _release(self) -> None:
        """The answer was read to its end: the connection goes back to the pool if it may."""
        self._stop_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(True)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _drop(self) -> None:
        self._stop_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(False)
