"""Request bodies bounded on every route (server/limits.py, issue 11): over the limit is a 413 on
feedback, admin and import routes too, refused unread when the declared length says so; a body
that stops arriving is dropped (408) instead of holding the request open."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(60)

KEYS = {"ka": "team-a"}
LIMIT = 1024 * 1024


@pytest.fixture
def served(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return make_proxy(fake_upstream.url, api_keys=KEYS, admin_key="adm", max_body_bytes=LIMIT, body_timeout_s=0.5,
                      memory={"embedder": "hashing", "distill": False})


ROUTES = [("/v1/feedback", "ka"), ("/admin/memory/import", "adm"), ("/v1/completions", "ka"),
          ("/v1/chat/completions", "ka")]


@pytest.mark.parametrize(("path", "key"), ROUTES)
def test_an_oversized_body_is_a_413_on_every_route(served: ProxyServer, path: str, key: str) -> None:
    big = b'{"id": "' + b"x" * (LIMIT + 10) + b'", "score": 0.5}'
    headers = {"authorization": f"Bearer {key}"}
    r = httpx.post(served.root + path, headers=headers, content=big, timeout=20)  # declared length
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no declared length: counted as it arrives
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(served.root + path, headers=headers, content=chunks(), timeout=20)
    assert r.status_code == 413, r.text[:300]
    assert len(r.text) < 500


def _raw(served: ProxyServer, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    s.sendall(head)
    return s


def _status(s: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize(("path", "key"), ROUTES[:2])
def test_a_declared_length_over_the_limit_is_refused_before_the_body(served: ProxyServer, path: str,
                                                                     key: str) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {17 * 1024 * 1024}\r\n\r\n{{\"id\":").encode()
    with _raw(served, head) as s:
        assert _status(s) == 413  # without the 17 MiB ever being sent


@pytest.mark.parametrize(("path", "key"), ROUTES[:1] + ROUTES[-1:])
def test_a_stalled_body_is_dropped(served: ProxyServer, path: str, key: str) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\":").encode()
    t0 = time.monotonic()
    with _raw(served, head) as s:
        assert _status(s) == 408
    assert time.monotonic() - t0 < 5
    assert httpx.get(served.root + "/health", timeout=5).status_code == 200


def test_streamed_answers_still_wait_for_the_client(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    """The body timeout ends with the body: a stream longer than it is not cut."""
    fake_upstream.tok = 0.05  # 16 tokens over ~0.8 s, past the 0.5 s body timeout
    with httpx.stream("POST", served.url + "/chat/completions", headers={"authorization": "Bearer ka"}, timeout=20,
                      json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(("path", "key"), ROUTES)
def test_a_client_leaving_mid_upload_is_not_a_server_error(served: ProxyServer, path: str, key: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"id\":").encode()
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            s = _raw(served, head + b"x" * 1000)
            time.sleep(0.05)
            s.close()
        time.sleep(0.5)
        assert httpx.get(served.root + "/health", timeout=5).status_code == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
