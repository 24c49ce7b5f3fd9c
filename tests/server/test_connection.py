"""The request-head deadline (server/connection.py): connections whose head never completes are
answered 408 and closed, alone or by the dozen, while complete requests and keep-alive work."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from server.connection import HeadDeadlineProtocol, _OneWrite, with_head_timeout
from tests.proxy_server import free_port

pytestmark = pytest.mark.timeout(60)
DEADLINE = 0.5


async def _app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve(http: Any) -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app, host="127.0.0.1", port=port, http=http, log_level="warning",
                                           loop="asyncio", timeout_keep_alive=30))
    t = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    yield port
    server.should_exit = True
    t.join(10)


@pytest.fixture
def port() -> Iterator[int]:
    yield from _serve(with_head_timeout(DEADLINE))


@pytest.fixture
def plain_port() -> Iterator[int]:
    yield from _serve("httptools")


def _read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        return data + b"<still open>"
    return data


def _response(s: socket.socket) -> bytes:
    """One whole 200 answer of the test app (its head and its two-byte body)."""
    s.settimeout(5)
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    return data


def test_a_partial_head_gets_a_408_and_the_connection_closes(port: int) -> None:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        data = _read_all(s, 5)
    assert data.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in data and b"<still open>" not in data
    assert DEADLINE <= time.monotonic() - t0 < DEADLINE + 2


def test_without_the_deadline_such_a_connection_stays_open(plain_port: int) -> None:
    """The defect, shown on uvicorn's own protocol: the same half-sent head is held."""
    with socket.create_connection(("127.0.0.1", plain_port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert _read_all(s, DEADLINE + 1.0) == b"<still open>"


def test_many_half_open_connections_are_all_closed(port: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHo")
        results = [_read_all(s, 5) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(r.startswith(b"HTTP/1.1 408 ") for r in results)


def test_complete_and_keep_alive_requests_are_served(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        time.sleep(DEADLINE / 2)  # slow, but within the deadline
        s.sendall(b"\r\n")
        assert _response(s).startswith(b"HTTP/1.1 200 ")
        time.sleep(DEADLINE * 2)  # idle between requests: keep-alive's business, not the head deadline's
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(s).startswith(b"HTTP/1.1 200 ")
        s.sendall(b"GET / HTTP/1.1\r\nHo")  # the next request's head stalls
        assert _read_all(s, 5).startswith(b"HTTP/1.1 408 ")


def test_the_factory_sets_the_deadline() -> None:
    cls = with_head_timeout(3.5)
    assert issubclass(cls, HeadDeadlineProtocol) and cls.head_timeout_s == 3.5


class _Recording:
    """A transport that records its writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def test_a_head_and_its_body_go_out_in_one_write() -> None:
    inner = _Recording()
    t = _OneWrite(inner, asyncio.get_running_loop())
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
    t.write(head)
    t.write(b"ok")
    assert inner.writes == [head + b"ok"]
    t.write(head)  # a stream's head whose first chunk is not ready: out one loop turn later
    assert inner.writes == [head + b"ok"]
    await asyncio.sleep(0)
    assert inner.writes == [head + b"ok", head]
    t.write(b"5\r\nchunk\r\n")
    t.write(head)
    t.close()  # a held head is flushed before the close
    assert inner.writes[-2:] == [b"5\r\nchunk\r\n", head] and inner.closed
    assert t.get_extra_info("peername", "x") == "x"  # the rest is the real transport's
