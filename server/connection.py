"""The HTTP connection protocol the server runs: uvicorn's httptools protocol with a deadline for
the request head. uvicorn bounds idle keep-alive connections but not a request whose headers
arrive slowly or never: each such connection would stay open for good, unseen by the
concurrency limit (which counts requests, and a request starts only with its complete head).
The deadline starts when the connection opens, or a new request's first byte arrives, and ends
with the head; past it the connection gets a 408 and is closed.

It tells a request's ``Departure`` (server.streaming) when its client leaves, so the work for
it is cancelled without a task per request waiting on ``receive``; and it sends a response's
head and the start of its body in one write (``_OneWrite``): uvicorn writes them separately, a
second syscall and a second segment for the client to take in. With 16 answers arriving at once
on a 2-core machine each such cost is paid one after another."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.streaming import DEPARTURE, Departure

_BODY = b'{"error":{"message":"The request head did not arrive in time.","type":"invalid_request_error",' \
        b'"param":null,"code":"request_timeout"}}'
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class _OneWrite:
    """The connection's transport, holding a response head back until the body's first write
    joins it. A head with no body write in the same step (a stream whose first chunk is still
    to come) goes out on its own one loop turn later; order is kept in every case."""

    __slots__ = ("_head", "_later", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None
        self._later: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if self._later is not None:
                self._later.cancel()
            self._transport.write(head + data)
        elif data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):  # uvicorn's response head
            self._head = data
            self._later = self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        head, self._head, self._later = self._head, None, None
        if head is not None:
            self._transport.write(head)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class HeadDeadlineProtocol(HttpToolsProtocol):
    """httptools with ``head_timeout_s`` for each request head (see the module docstring)."""

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(cast(asyncio.Transport, _OneWrite(transport, self.loop)))
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        scope = cast(dict[str, Any], self.scope)
        scope[DEPARTURE] = Departure()  # the same dict the request's cycle got

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            departure = cycle.scope.get(DEPARTURE)
            if isinstance(departure, Departure):
                departure.fire()  # cancels the work done for a client that is no longer there
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_408)
            self.transport.close()


def with_head_timeout(seconds: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn's ``http=``, with this deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout_s": seconds})
