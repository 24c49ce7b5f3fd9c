"""HTTP transports to the upstream: one small interface, three implementations.

The hot path uses ``server.h1`` (keep-alive HTTP/1.1 on asyncio protocols and httptools): measured
on a 2-core machine, aiohttp's client spends 120-180 us of CPU per request where h1 spends about
35 us, and httpx's ``AsyncClient`` adds several milliseconds per request under concurrency. Both
libraries are kept as alternatives (``--upstream-client aiohttp|httpx``) so the comparison stays
reproducible. Each transport translates its library's exceptions into ``UpstreamError`` in its
own module, the one boundary that meets them.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping

import aiohttp
import httpx

from protocol.errors import UpstreamConnectError, UpstreamError


class TransportResponse(abc.ABC):
    """A response whose headers have arrived; the body is read or streamed, then closed."""

    status: int
    content_type: str
    headers: Mapping[str, str]  # the response's headers (forwarded routes pass some on)

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The whole body; releases the connection back to the pool."""

    @abc.abstractmethod
    async def read_chunk(self) -> bytes:
        """The body bytes that have arrived (waiting for some); ``b""`` at the end.

        A coroutine rather than an iterator: each layer of async generator costs per chunk,
        and a proxy relays thousands of chunks a second."""

    def read_buffered(self) -> bytes:
        """The body bytes already received and not yet read, without waiting (``b""`` if none).

        Lets the relay send whatever piled up while it was writing as one write, with no
        timer armed; a transport that cannot tell returns ``b""`` and every read waits."""
        return b""

    def bound_waits(self, idle: float) -> bool:
        """Asks the transport to bound every wait of ``read``/``read_chunk`` for the upstream by
        ``idle`` seconds itself, raising ``TimeoutError`` (after dropping the connection) when
        one lasts longer: one timer per response instead of one per wait. False (the default):
        it cannot, and the caller arms a timer around each wait."""
        return False

    @abc.abstractmethod
    async def close(self) -> None:
        """Drops the connection (an upstream like vLLM then aborts the request). Idempotent."""


class Transport(abc.ABC):
    """Sends one request and returns as soon as the response headers are in."""

    @abc.abstractmethod
    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> TransportResponse:
        """Raises ``UpstreamConnectError`` when nothing came back, ``UpstreamError`` otherwise."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Closes the pool."""


class _AiohttpResponse(TransportResponse):
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self.content_type = resp.headers.get("Content-Type", "")

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            self._resp.close()
            raise UpstreamError(f"upstream answer could not be read: {exc!r}") from None

    async def read_chunk(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except (aiohttp.ClientError, OSError) as exc:
            self._resp.close()
            raise UpstreamError(f"upstream stream broke off: {exc!r}") from None

    def read_buffered(self) -> bytes:
        try:
            return self._resp.content.read_nowait()
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self._resp.close()
            raise UpstreamError(f"upstream stream broke off: {exc!r}") from None

    async def close(self) -> None:
        self._resp.close()


class AiohttpTransport(Transport):
    """One pooled ``aiohttp.ClientSession`` (the default before server.h1; kept to compare)."""

    def __init__(self, *, max_connections: int, connect_timeout: float) -> None:
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _get(self) -> aiohttp.ClientSession:
        # Created lazily so it binds to the running loop (uvicorn's), not the constructor's.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max, limit_per_host=0, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> TransportResponse:
        try:
            resp = await self._get().request(method, url, data=body, headers=headers)
        except (aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError, OSError) as exc:
            raise UpstreamConnectError(f"upstream unreachable: {exc!r}") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream answer unreadable: {exc!r}") from None
        return _AiohttpResponse(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _HttpxResponse(TransportResponse):
    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self._iter: AsyncIterator[bytes] | None = None
        self.status = resp.status_code
        self.headers = resp.headers
        self.content_type = resp.headers.get("content-type", "")

    async def read(self) -> bytes:
        try:
            return await self._resp.aread()
        except httpx.HTTPError as exc:
            await self._resp.aclose()
            raise UpstreamError(f"upstream answer could not be read: {exc!r}") from None

    async def read_chunk(self) -> bytes:
        if self._iter is None:
            self._iter = self._resp.aiter_raw().__aiter__()
        try:
            return await self._iter.__anext__()
        except StopAsyncIteration:
            return b""
        except httpx.HTTPError as exc:
            await self._resp.aclose()
            raise UpstreamError(f"upstream stream broke off: {exc!r}") from None

    async def close(self) -> None:
        await self._resp.aclose()


class HttpxTransport(Transport):
    """The design card's client; slower on the hot path, kept for measurement and control calls."""

    def __init__(self, *, max_connections: int, connect_timeout: float) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(None, connect=connect_timeout),
        )

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> TransportResponse:
        req = self._client.build_request(method, url, content=body, headers=dict(headers))
        try:
            resp = await self._client.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError,
                httpx.ReadError, httpx.WriteError) as exc:
            raise UpstreamConnectError(f"upstream unreachable: {exc!r}") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream answer unreadable: {exc!r}") from None
        return _HttpxResponse(resp)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_transport(kind: str, *, max_connections: int, connect_timeout: float) -> Transport:
    if kind == "h1":
        from server.h1 import H1Transport  # here, not at the top: server.h1 builds on this module

        return H1Transport(max_connections=max_connections, connect_timeout=connect_timeout)
    if kind == "aiohttp":
        return AiohttpTransport(max_connections=max_connections, connect_timeout=connect_timeout)
    if kind == "httpx":
        return HttpxTransport(max_connections=max_connections, connect_timeout=connect_timeout)
    raise ValueError(f"unknown upstream client {kind!r} (h1, aiohttp or httpx)")
