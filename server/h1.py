"""The hot path's HTTP/1.1 client: keep-alive connections on asyncio protocols, httptools' parser.

Why not aiohttp: measured on a 2-core machine, its client spends 120-180 us of CPU per proxied
request (request object, payload registry, header multidicts, stream reader, timers) where this
one spends about 35 us; at 16 concurrent requests whose answers arrive together, that CPU is
paid one request after another, so it sets the proxy's added p99 (loadtest/overhead.py).

What it does: one request at a time per connection (no pipelining), idle connections kept per
origin and dropped as soon as the server closes them, the body sent with a ``Content-Length``,
answers framed by ``Content-Length``, chunked encoding or the end of the connection (httptools
decodes all three), reading paused while more than 1 MiB wait for a slow reader,
and a dropped connection whenever an answer is abandoned unread (vLLM then aborts the request).
No ``Accept-Encoding`` is sent, so a conforming server answers uncompressed. Its exceptions are
translated into ``UpstreamError`` here, like the other transports'.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping
from typing import cast
from urllib.parse import quote

import httptools

from protocol.errors import UpstreamConnectError, UpstreamError
from server.h1_response import H1Response, Headers
from server.transport import Transport, TransportResponse

_NO_LENGTH_BODY = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})  # no Content-Length: 0 when bodiless
_SAFE = "/:@!$&'()*+,;=?%~-._"


class _Origin:
    """scheme://host:port, parsed once: the pool key, the Host header, the TLS context."""

    __slots__ = ("host", "host_header", "idle", "pool", "port", "ssl")

    def __init__(self, scheme: str, netloc: str, pool: H1Transport) -> None:
        host, _, port = netloc.rpartition(":") if netloc.rfind(":") > netloc.rfind("]") else (netloc, "", "")
        self.host = host.strip("[]")
        self.port = int(port) if port else (443 if scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if scheme == "https" else None
        self.host_header = netloc
        self.idle: list[_Connection] = []
        self.pool = pool


class _Connection(asyncio.Protocol):
    """One keep-alive connection: feeds httptools and hands the answer to its ``H1Response``."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.keep_alive = False  # the last answer's framing and headers allow another request
        self.idle_since = 0.0  # when it went back to the pool
        self.response: H1Response | None = None  # the answer being received, if any
        self._head: asyncio.Future[H1Response] | None = None
        self._names: list[str] = []
        self._values: list[str] = []

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, only alike
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # a request's head and body go out without waiting
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._head is None and self.response is None:
            self.abort()  # bytes nobody asked for: the connection is no longer in step
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"upstream answer unreadable: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self.origin.idle:
            self.origin.idle.remove(self)
        resp = self.response
        if resp is not None and resp.until_close and not resp.done:
            resp.finish()  # no length and not chunked: the end of the connection ends the body
            return
        self._fail(UpstreamError("upstream stream broke off: the connection closed mid-answer") if resp is not None
                   else UpstreamConnectError("upstream closed the connection before answering"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._names.append(name.decode("latin-1").lower())
        self._values.append(value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        headers = Headers()
        for name, value in zip(self._names, self._values, strict=True):
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self._names, self._values = [], []
        status = self.parser.get_status_code()
        if status < 200:
            return  # an interim answer (100 Continue): the real one follows
        framed = "content-length" in headers or "chunked" in (headers.get("transfer-encoding") or "")
        # read here: once the message is complete the parser has reset and answers False
        self.keep_alive = framed and self.parser.should_keep_alive()
        resp = self.response = H1Response(self, status, headers, until_close=not framed)
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(resp)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response.finish()

    # -- requests ----------------------------------------------------------------------------

    async def request(self, data: bytes, body: bytes | None) -> H1Response:
        assert self.transport is not None
        self._head = head = asyncio.get_running_loop().create_future()
        if body and len(body) > 65536:
            self.transport.writelines((data, body))  # a large upload is not copied to be joined
        else:
            self.transport.write(data + body if body else data)
        try:
            resp: H1Response = await head
            return resp
        except BaseException:
            self.abort()  # cancelled or failed before the answer: the upstream must not go on
            raise

    def _fail(self, exc: UpstreamError) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        elif self.response is not None and not self.response.done:
            self.response.fail(exc)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def done(self, reuse: bool) -> None:
        """Its answer is finished with: read to the end (``reuse``) or abandoned (dropped)."""
        self.response = None
        if not reuse:
            self.abort()
        self.origin.pool.release(self, reuse and self.keep_alive and not self.closed)


class H1Transport(Transport):
    """The default transport: pooled keep-alive HTTP/1.1 connections, at most ``max_connections``
    requests in flight (more wait for a slot). A connection idle longer than ``keepalive_expiry``
    is closed, not reused: under uvicorn's (and so vLLM's) 5 s keep-alive, so a request is never
    written to a connection the server is closing at that moment. Nothing is resent: a request
    that may have reached the server is the caller's to retry."""

    def __init__(self, *, max_connections: int, connect_timeout: float, keepalive_expiry: float = 4.0) -> None:
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive_expiry
        self._origins: dict[str, _Origin] = {}
        self._active = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    def _origin(self, url: str) -> tuple[_Origin, str]:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise UpstreamConnectError(f"upstream unreachable: unsupported URL {url!r}")
        netloc, slash, target = rest.partition("/")
        key = url[: len(scheme) + 3 + len(netloc)]
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(scheme, netloc, self)
        target = slash + target or "/"
        if not (target.isascii() and target.isprintable()) or " " in target:
            target = quote(target, safe=_SAFE)
        return origin, target

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> TransportResponse:
        origin, target = self._origin(url)
        data = _head(method, target, origin.host_header, headers, body)
        if self._active >= self._max:
            slot = asyncio.get_running_loop().create_future()
            self._waiting.append(slot)
            try:
                await slot
            except BaseException:
                if slot.done() and not slot.cancelled():
                    self._next()  # the slot was handed over as we were cancelled: pass it on
                raise
        else:
            self._active += 1
        try:
            conn = self._idle(origin) or await self._connect(origin)
            return await conn.request(data, body)
        except BaseException:
            self._next()
            raise

    def _idle(self, origin: _Origin) -> _Connection | None:
        idle = origin.idle
        while idle:
            conn = idle.pop()
            if time.monotonic() - conn.idle_since > self._keepalive:
                # Idle past the expiry, and so are all below it (the newest is on top): the
                # server may be closing them right now, and a POST is not sent twice.
                for old in (conn, *idle):
                    old.abort()
                idle.clear()
                return None
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(origin), origin.host, origin.port,
                                                       ssl=origin.ssl)
        except TimeoutError:
            raise UpstreamConnectError(f"upstream unreachable: no connection within {self._connect_timeout:g} s") \
                from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"upstream unreachable: {exc!r}") from None
        return conn

    def release(self, conn: _Connection, reuse: bool) -> None:
        if reuse:
            conn.idle_since = time.monotonic()
            conn.origin.idle.append(conn)
        self._next()

    def _next(self) -> None:
        """A request finished: its slot goes to the longest waiter, else back to the count."""
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self._active -= 1

    async def aclose(self) -> None:
        for origin in self._origins.values():
            for conn in origin.idle:
                conn.abort()
            origin.idle.clear()
        self._origins.clear()


def _head(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise UpstreamError(f"invalid header {name!r}: a line break in a header")
        lines.append(f"{name}: {value}\r\n")
    if body is not None or method not in _NO_LENGTH_BODY:
        lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
    lines.append("\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise UpstreamError(f"a header or the path cannot be sent: {exc}") from None
