"""``server.h1``: what the shared transport tests (test_upstream.py) do not reach: keep-alive reuse,
framing by the end of the connection, a connection the server closed while idle, the slot limit,
the idle bound, and what is refused before anything is sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from protocol.errors import UpstreamConnectError, UpstreamError
from server.h1 import H1Transport, Headers

pytestmark = [pytest.mark.timeout(20)]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A scripted HTTP/1.1 server: counts connections, records request heads."""

    def __init__(self, answer: Handler | None = None) -> None:
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self._answer = answer or self.ok
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.bodies.append(await reader.readexactly(length) if length else b"")
                await self._answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()


def _held(gate: asyncio.Event) -> Handler:
    """An answer that waits for ``gate``."""

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        await RawServer.ok(reader, writer)

    return held


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    made: list[RawServer] = []

    async def make(answer: Handler | None = None) -> RawServer:
        s = RawServer(answer)
        await s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()


@pytest.fixture
async def transport() -> AsyncIterator[H1Transport]:
    t = H1Transport(max_connections=8, connect_timeout=2)
    yield t
    await t.aclose()


async def test_one_connection_serves_request_after_request(serve: Callable[..., Awaitable[RawServer]],
                                                          transport: H1Transport) -> None:
    server = await serve()
    for _ in range(5):
        resp = await transport.send("POST", server.url + "/v1/chat/completions", b'{"a":1}',
                                    {"Content-Type": "application/json"})
        assert resp.status == 200 and await resp.read() == b"{}"
    assert server.connections == 1 and len(server.heads) == 5
    head = server.heads[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head and "Content-Length: 7\r\n" in head
    assert "accept-encoding" not in head.lower()  # no compressed answers asked for
    assert server.bodies[0] == b'{"a":1}'


async def test_an_answer_left_unread_drops_its_connection(serve: Callable[..., Awaitable[RawServer]],
                                                          transport: H1Transport) -> None:
    server = await serve()
    resp = await transport.send("GET", server.url + "/x", None, {})
    await resp.close()  # closed before the body was read: the upstream must see the connection go
    resp = await transport.send("GET", server.url + "/x", None, {})
    assert await resp.read() == b"{}"
    assert server.connections == 2
    assert "content-length" not in server.heads[0].decode().lower()  # a GET with no body says nothing


async def test_a_body_framed_by_the_end_of_the_connection(serve: Callable[..., Awaitable[RawServer]],
                                                          transport: H1Transport) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"world")
        writer.close()

    server = await serve(until_close)
    resp = await transport.send("GET", server.url + "/x", None, {})
    assert resp.headers["Content-Type"] == "text/plain"
    assert await resp.read() == b"hello world"
    resp = await transport.send("GET", server.url + "/x", None, {})  # not reused: a new connection
    assert await resp.read() == b"hello world"
    assert server.connections == 2


async def test_chunked_answers_are_decoded_as_they_come(serve: Callable[..., Awaitable[RawServer]],
                                                        transport: H1Transport) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    server = await serve(chunked)
    for _ in range(2):
        resp = await transport.send("POST", server.url + "/s", b"{}", {})
        pieces = []
        while chunk := await resp.read_chunk():
            pieces.append(chunk)
        assert pieces == [b"data: 1\n\n", b"data: 2\n\n"]
    assert server.connections == 1  # the chunked answer ended cleanly: the connection is reused


async def test_a_connection_the_server_closed_while_idle_is_not_used(
        serve: Callable[..., Awaitable[RawServer]], transport: H1Transport) -> None:
    async def close_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await RawServer.ok(reader, writer)
        writer.close()  # the idle keep-alive connection goes (as uvicorn's keep-alive timeout does)

    server = await serve(close_after)
    assert await (await transport.send("GET", server.url + "/x", None, {})).read() == b"{}"
    await asyncio.sleep(0.1)
    assert await (await transport.send("GET", server.url + "/x", None, {})).read() == b"{}"
    assert server.connections == 2


async def test_a_connection_idle_past_the_expiry_is_closed_not_reused(
        serve: Callable[..., Awaitable[RawServer]]) -> None:
    # The server may be closing it at the moment it is reused, and a POST is never sent twice,
    # so the client lets it go first (under uvicorn's 5 s keep-alive).
    server = await serve()
    t = H1Transport(max_connections=8, connect_timeout=2, keepalive_expiry=0.2)
    try:
        for pause in (0.0, 0.05, 0.3, 0.05):
            await asyncio.sleep(pause)
            assert await (await t.send("POST", server.url + "/x", b"{}", {})).read() == b"{}"
        assert server.connections == 2  # a new one only after the 0.3 s pause
    finally:
        await t.aclose()


async def test_a_drop_before_the_answer_is_a_connect_error_and_mid_body_is_not(
        serve: Callable[..., Awaitable[RawServer]], transport: H1Transport) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await serve(drop)
    with pytest.raises(UpstreamConnectError):
        await transport.send("POST", server.url + "/x", b"{}", {})

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()
        writer.close()

    server = await serve(cut)
    resp = await transport.send("POST", server.url + "/x", b"{}", {})
    with pytest.raises(UpstreamError) as info:
        await resp.read()
    assert not isinstance(info.value, UpstreamConnectError)


async def test_requests_past_the_limit_wait_for_a_slot(serve: Callable[..., Awaitable[RawServer]]) -> None:
    gate = asyncio.Event()
    server = await serve(_held(gate))
    t = H1Transport(max_connections=2, connect_timeout=2)
    try:
        async def one() -> bytes:
            return await (await t.send("GET", server.url + "/x", None, {})).read()

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        await asyncio.sleep(0.2)
        assert server.connections == 2 and len(server.heads) == 2  # three wait for a slot
        gate.set()
        assert await asyncio.gather(*tasks) == [b"{}"] * 5
        assert server.connections == 2  # the waiting three reused the two connections
    finally:
        await t.aclose()


async def test_a_cancelled_waiter_gives_its_slot_on(serve: Callable[..., Awaitable[RawServer]]) -> None:
    gate = asyncio.Event()
    server = await serve(_held(gate))
    t = H1Transport(max_connections=1, connect_timeout=2)
    try:
        first = asyncio.create_task(t.send("GET", server.url + "/x", None, {}))
        await asyncio.sleep(0.1)
        waiter = asyncio.create_task(t.send("GET", server.url + "/x", None, {}))
        await asyncio.sleep(0.1)
        waiter.cancel()
        gate.set()
        assert await (await first).read() == b"{}"
        with pytest.raises(asyncio.CancelledError):
            await waiter
        resp = await asyncio.wait_for(t.send("GET", server.url + "/x", None, {}), 2)  # the slot is free
        assert await resp.read() == b"{}"
    finally:
        await t.aclose()


async def test_waits_are_bounded_by_one_timer(serve: Callable[..., Awaitable[RawServer]],
                                              transport: H1Transport) -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    server = await serve(stalls)
    resp = await transport.send("GET", server.url + "/x", None, {})
    assert resp.bound_waits(0.2)
    assert await resp.read_chunk() == b"abcd"
    await asyncio.sleep(0.3)  # the reader away longer than the bound: not the upstream's idleness
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await resp.read_chunk()
    assert 0.15 < loop.time() - t0 < 1.0


async def test_refused_before_sending(transport: H1Transport) -> None:
    with pytest.raises(UpstreamError, match="line break"):
        await transport.send("GET", "http://127.0.0.1:9/x", None, {"X-Request-Id": "a\r\nInjected: 1"})
    with pytest.raises(UpstreamConnectError, match="unsupported URL"):
        await transport.send("GET", "ftp://127.0.0.1/x", None, {})
    with pytest.raises(UpstreamConnectError):
        await transport.send("GET", "http://127.0.0.1:9/x", None, {})  # nothing listens on port 9


async def test_paths_are_sent_quoted(serve: Callable[..., Awaitable[RawServer]], transport: H1Transport) -> None:
    server = await serve()
    await (await transport.send("GET", server.url + "/v1/files/a b/é?x=1%20", None, {})).read()
    assert server.heads[0].startswith(b"GET /v1/files/a%20b/%C3%A9?x=1%20 HTTP/1.1\r\n")


def test_headers_are_found_whatever_the_case() -> None:
    h = Headers({"content-type": "text/plain"})
    assert h["Content-Type"] == "text/plain" and h.get("CONTENT-TYPE") == "text/plain"
    assert "Content-Type" in h and h.get("x-missing") is None
