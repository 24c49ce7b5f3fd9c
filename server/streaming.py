"""Server-sent events to the client, and cancelling upstream work when the client goes away.

``SSEResponse`` is a lean ASGI response: it sends each chunk the moment the producer yields it,
watches the connection for a disconnect (which cancels the producer, and with it the upstream
request), and turns an error raised mid-stream into an SSE ``error`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import orjson
from starlette.responses import Response

from protocol.errors import SharpenError, as_sharpen_error, status_of
from server.responses import error_event

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
T = TypeVar("T")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE = b"data: [DONE]\n\n"
_USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')
KEEPALIVE = b": keep-alive\n\n"


class ClientGone(Exception):
    """The client disconnected; the work done for it was cancelled."""


def outcome_status(exc: BaseException) -> int:
    """The status a failed request is counted under; 499 when the client left (a relay closed
    mid-stream sees GeneratorExit)."""
    if isinstance(exc, SharpenError):
        return status_of(exc)
    if isinstance(exc, asyncio.CancelledError | ConnectionError | GeneratorExit | ClientGone):
        return 499
    return 500


def sse_event(obj: Any, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


DEPARTURE = "sharpen.departure"  # the scope key of a request's ``Departure`` (set by server.connection)


class Departure:
    """A request's client leaving, told by the server's connection (``fire`` on connection lost)
    rather than found by a task that waits on ``receive``: one fewer task per request."""

    __slots__ = ("gone", "task")

    def __init__(self) -> None:
        self.gone = False
        self.task: asyncio.Task[Any] | None = None

    def fire(self) -> None:
        self.gone = True
        if self.task is not None and not self.task.done():
            self.task.cancel()


class Watch:
    """While armed, the client leaving cancels the current task; ``gone`` says it left. Uses the
    scope's ``Departure`` when the server set one, else a task waiting on ``receive``."""

    __slots__ = ("_departure", "_flag", "_watcher", "task")

    def __init__(self, scope: MutableMapping[str, Any] | None, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self._departure: Departure | None = scope.get(DEPARTURE) if scope is not None else None
        self._flag: list[bool] = []
        self._watcher: asyncio.Task[None] | None = None
        if self._departure is not None:
            self._departure.task = task
            if self._departure.gone:
                task.cancel()  # it left already: the next await ends the work
        else:
            self._watcher = asyncio.get_running_loop().create_task(_watch(receive, task, self._flag))

    @property
    def gone(self) -> bool:
        return self._departure.gone if self._departure is not None else bool(self._flag)

    def mark_gone(self) -> None:
        if self._departure is not None:
            self._departure.gone = True
        else:
            self._flag.append(True)

    def stop(self) -> None:
        if self._departure is not None:
            self._departure.task = None
        elif self._watcher is not None:
            self._watcher.cancel()


async def _watch(receive: Receive, task: asyncio.Task[Any], flag: list[bool]) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            flag.append(True)
            task.cancel()
            return


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T],
                               scope: MutableMapping[str, Any] | None = None) -> T:
    """Awaits ``work``; if the client disconnects first, cancels it and raises ``ClientGone``.

    Call only once the request body has been read: without a ``Departure`` in ``scope`` the
    watcher consumes ``receive``.
    """
    watch = Watch(scope, receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.gone and watch.task.uncancel() == 0:
            raise ClientGone() from None
        raise
    finally:
        watch.stop()


class SSEResponse(Response):
    """Relays ``chunks`` as an event stream; ``on_close`` runs once whatever happened."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        on_close: Callable[[bool, SharpenError | None], None] | None = None,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        # Response.__init__ is skipped on purpose: this class sends its own messages.
        self.status_code = 200
        self.background = None
        self._chunks = chunks
        self._sse_headers = SSE_HEADERS + (headers or [])
        self._on_close = on_close
        self._tap = tap

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watch = Watch(scope, receive)
        failure: SharpenError | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._sse_headers})
            tap = self._tap
            try:
                async for chunk in self._chunks:
                    if tap is not None:
                        tap(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except Exception as exc:
                # The status line is gone already: report in-band, then end the stream.
                failure = as_sharpen_error(exc)
                await send({"type": "http.response.body", "body": error_event(exc) + DONE, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not (watch.gone and watch.task.uncancel() == 0):
                raise
        except OSError:
            watch.mark_gone()  # the socket broke under us: the same as a disconnect
        finally:
            watch.stop()
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # type: ignore[attr-defined]
            if self._on_close is not None:
                self._on_close(watch.gone, failure)


class UsageSniffer:
    """Finds the ``usage`` object in a relayed SSE stream without parsing every chunk.

    vLLM sends usage in the last data event when ``stream_options.include_usage`` is set; only
    the last few chunks are kept (by reference, no copying) and parsed at the end.
    """

    def __init__(self) -> None:
        self._last: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        last = self._last
        last.append(chunk)
        if len(last) > 3:
            del last[0]

    def usage(self) -> dict[str, Any] | None:
        tail = b"".join(self._last)
        # The last ``"usage": {`` (vLLM writes it compact, other servers with a space).
        starts = [m.start() for m in _USAGE_RE.finditer(tail)]
        if not starts:
            return None
        idx = starts[-1]
        start = tail.rfind(b"data: ", 0, idx)
        end = tail.find(b"\n", idx)
        if start < 0:
            return None
        try:
            data = orjson.loads(tail[start + 6 : end if end >= 0 else None])
        except orjson.JSONDecodeError:
            return None
        u = data.get("usage") if isinstance(data, dict) else None
        return u if isinstance(u, dict) else None
