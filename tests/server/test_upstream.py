"""``server.upstream.Upstream`` against the fake, over both transports."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import orjson
import pytest
from aiohttp import web

from protocol.errors import UpstreamError, UpstreamStatusError, UpstreamTimeout, status_of
from server.settings import UpstreamSettings
from server.transport import (
    AiohttpTransport,
    HttpxTransport,
    Transport,
    TransportResponse,
    UpstreamConnectError,
    make_transport,
)
from server.upstream import Upstream
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import free_port

pytestmark = [pytest.mark.timeout(30)]

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "two plus two"}]}


@pytest.fixture(params=["h1", "aiohttp", "httpx"])
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_upstream(client: str) -> AsyncIterator[Any]:
    made: list[Upstream] = []

    def make(url: str, transport: Transport | None = None, **settings: Any) -> Upstream:
        s = UpstreamSettings(client=client, **settings)
        u = Upstream(url, s, transport=transport)
        made.append(u)
        return u

    yield make
    for u in made:
        await u.aclose()


class Counting(Transport):
    """Wraps a transport and counts the requests sent through it."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.sent: list[str] = []

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> TransportResponse:
        self.sent.append(url)
        return await self.inner.send(method, url, body, headers)

    async def aclose(self) -> None:
        await self.inner.aclose()


def counting(client: str) -> Counting:
    return Counting(make_transport(client, max_connections=10, connect_timeout=2))


def test_make_transport_picks_the_client() -> None:
    assert isinstance(make_transport("aiohttp", max_connections=1, connect_timeout=1), AiohttpTransport)
    assert isinstance(make_transport("httpx", max_connections=1, connect_timeout=1), HttpxTransport)
    with pytest.raises(ValueError, match="unknown upstream client"):
        make_transport("curl", max_connections=1, connect_timeout=1)


def test_urls() -> None:
    u = Upstream("http://h:1/v1/", UpstreamSettings())
    assert u.base_url == "http://h:1/v1" and u.root_url == "http://h:1"
    assert Upstream("http://h:1/api", UpstreamSettings()).root_url == "http://h:1/api"


# ------------------------------------------------------------------------ requests


async def test_post_json(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, api_key="up-key")
    data = await u.post_json("/chat/completions", {**CHAT, "top_k": 3})
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == fake_upstream.default_content(CHAT, 0)
    rec = fake_upstream.completion_calls()[-1]
    assert rec.json == {**CHAT, "top_k": 3}
    assert rec.headers["authorization"] == "Bearer up-key"
    assert rec.headers["content-type"] == "application/json"


async def test_get_json_and_healthy(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url)
    fake_upstream.adapters["a1"] = "/p"
    data = await u.get_json("/models")
    assert [c["id"] for c in data["data"]] == ["fake", "a1"]
    assert await u.healthy()
    assert [r.path for r in fake_upstream.requests][-1] == "/health"
    await asyncio.to_thread(fake_upstream.stop)
    assert not await u.healthy()


@contextlib.asynccontextmanager
async def tiny_server(routes: list[tuple[str, str, Any]]) -> AsyncIterator[str]:
    """A throwaway aiohttp server with just ``routes``; yields its /v1 base URL."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_healthy_falls_back_to_models_only_on_404(make_upstream: Any) -> None:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    async with tiny_server([("GET", "/v1/models", models)]) as url:  # no /health: 404
        assert await make_upstream(url, retries=0).healthy()
    async with tiny_server([("GET", "/health", broken), ("GET", "/v1/models", models)]) as url:
        assert not await make_upstream(url, retries=0).healthy()
    async with tiny_server([]) as url:
        assert not await make_upstream(url, retries=0).healthy()


async def test_non_json_answer_is_an_upstream_error(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url)
    fake_upstream.push_response(200, b"{not json")
    with pytest.raises(UpstreamError, match="not valid JSON") as info:
        await u.post_json("/chat/completions", CHAT)
    assert status_of(info.value) == 502
    fake_upstream.push_response(200, b"[1, 2]")
    with pytest.raises(UpstreamError, match="not a JSON object"):
        await u.post_json("/chat/completions", CHAT)


async def test_streaming_chunks(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url)
    fake_upstream.tok = 0.01
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))
    assert reply.status == 200
    pieces = [c async for c in reply.chunks()]
    raw = b"".join(pieces)
    assert len(pieces) > 5  # arrived as produced, not as one body
    assert raw.endswith(b"data: [DONE]\n\n")
    events = [e for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]
    text = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == fake_upstream.default_content(CHAT, 0)
    assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 0)
    assert fake_upstream.cancelled == 0


async def test_streaming_chunks_arrive_before_the_end(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url)
    fake_upstream.tok = 0.05
    fake_upstream.length = 10
    t0 = time.monotonic()
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))
    times = [time.monotonic() - t0 async for _ in reply.chunks()]
    assert times[0] < 0.3
    assert times[-1] - times[0] > 0.35


async def test_chunks_that_pile_up_while_writing_go_out_as_one(
    fake_upstream: FakeUpstream, make_upstream: Any, client: str
) -> None:
    u = make_upstream(fake_upstream.url)
    fake_upstream.tok = 0.005
    fake_upstream.length = 40
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))
    pieces = []
    async for chunk in reply.chunks():
        pieces.append(chunk)
        await asyncio.sleep(0.05)  # a slow write to the client: ~10 tokens arrive meanwhile
    raw = b"".join(pieces)
    assert raw.endswith(b"data: [DONE]\n\n")
    events = [e for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]
    text = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == fake_upstream.default_content(CHAT, 0)
    if client != "httpx":  # h1 and aiohttp hand over everything buffered; httpx yields chunk by chunk
        assert len(pieces) < len(events) / 3


class Buffered(TransportResponse):
    """Bytes already received: ``read_buffered`` hands them over; ``read_chunk`` counts waits."""

    status, content_type = 200, "text/event-stream"
    headers: dict[str, str] = {}

    def __init__(self, parts: list[bytes]) -> None:
        self.parts, self.waits = parts, 0

    async def read(self) -> bytes:
        raise AssertionError("not used")

    async def read_chunk(self) -> bytes:
        self.waits += 1
        return self.parts.pop(0) if self.parts else b""

    def read_buffered(self) -> bytes:
        data, self.parts = b"".join(self.parts[:2]), self.parts[2:]
        return data

    async def close(self) -> None:
        pass


async def test_buffered_bytes_are_relayed_without_waiting() -> None:
    from server.upstream import UpstreamReply

    resp = Buffered([b"a", b"b", b"c", b"d", b"e"])
    pieces = [c async for c in UpstreamReply(resp, idle=5).chunks()]
    assert pieces == [b"ab", b"cd", b"e"] and resp.waits == 1  # one wait: for the end of the stream


async def test_closing_a_stream_early_cancels_the_upstream(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url)
    fake_upstream.tok = 0.05
    fake_upstream.length = 200
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))
    chunks = reply.chunks()
    assert await anext(chunks)
    await chunks.aclose()  # type: ignore[attr-defined]
    assert await fake_upstream.async_wait_until(lambda: fake_upstream.cancelled == 1, timeout=2)
    assert await fake_upstream.async_wait_until(lambda: fake_upstream.in_flight == 0, timeout=2)


async def test_mid_stream_cut_raises_upstream_error(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url)
    fake_upstream.fault = "drop_mid"
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))
    got = b""
    with pytest.raises(UpstreamError) as info:
        async for c in reply.chunks():
            got += c
    assert not isinstance(info.value, UpstreamConnectError)  # data had come: not retryable
    assert b'"content": "w0"' in got and b"[DONE]" not in got


# ------------------------------------------------------------------------ retries


async def test_retry_on_connect_failure_counts_attempts(make_upstream: Any, client: str) -> None:
    t = counting(client)
    u = make_upstream(f"http://127.0.0.1:{free_port()}/v1", transport=t, retries=2, retry_backoff=0.01)
    with pytest.raises(UpstreamConnectError) as info:
        await u.post_json("/chat/completions", CHAT)
    assert status_of(info.value) == 502
    assert len(t.sent) == 3


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose accept queue is full: connecting hangs until the client's connect timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fill = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fill.append(c)
    yield port
    for c in fill:
        c.close()
    srv.close()


async def test_connect_timeout_is_a_retryable_connect_error(make_upstream: Any, client: str,
                                                            unanswered_port: int) -> None:
    t = Counting(make_transport(client, max_connections=10, connect_timeout=0.2))
    u = make_upstream(f"http://127.0.0.1:{unanswered_port}/v1", transport=t, retries=1, retry_backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(UpstreamConnectError, match="unreachable"):
        await u.get_json("/models")
    assert len(t.sent) == 2
    assert time.monotonic() - t0 < 3


async def test_retry_on_connect_failure_succeeds_when_the_upstream_comes_up(make_upstream: Any) -> None:
    port = free_port()
    u = make_upstream(f"http://127.0.0.1:{port}/v1", retries=4, retry_backoff=0.1)
    fake = FakeUpstream(port=port)
    call = asyncio.create_task(u.post_json("/chat/completions", CHAT))
    await asyncio.sleep(0.15)  # at least one attempt has failed by now
    assert not call.done()
    await asyncio.to_thread(fake.start)
    try:
        data = await asyncio.wait_for(call, 5)
        assert data["choices"][0]["message"]["content"].endswith("42.")
        assert len(fake.completion_calls()) == 1
    finally:
        await asyncio.to_thread(fake.stop)


async def test_dropped_before_headers_is_retried(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, retries=2, retry_backoff=0.01)
    fake_upstream.fault = "drop"
    with pytest.raises(UpstreamConnectError):
        await u.post_json("/chat/completions", CHAT)
    assert len(fake_upstream.completion_calls()) == 3


async def test_retry_statuses(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, retries=2, retry_backoff=0.01)
    for status in (502, 503, 504):
        fake_upstream.push_response(status, {"error": {"message": "busy"}})
    with pytest.raises(UpstreamStatusError) as info:
        await u.post_json("/chat/completions", CHAT)
    assert info.value.http_status == 504  # the last answer's
    fake_upstream.clear()
    fake_upstream.push_response(503, {"error": {"message": "busy"}})
    assert (await u.post_json("/chat/completions", CHAT))["object"] == "chat.completion"
    assert len(fake_upstream.completion_calls()) == 2


async def test_no_retries_when_disabled(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, retries=0)
    fake_upstream.push_response(503, {"error": {"message": "busy"}})
    with pytest.raises(UpstreamStatusError):
        await u.post_json("/chat/completions", CHAT)
    assert len(fake_upstream.completion_calls()) == 1


# ------------------------------------------------------------------------ timeouts


async def test_first_byte_timeout(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, timeouts={"first_byte": 0.3})
    fake_upstream.fault = "hang"
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await u.post_json("/chat/completions", CHAT)
    assert 0.25 < time.monotonic() - t0 < 2
    assert status_of(info.value) == 504
    assert len(fake_upstream.completion_calls()) == 1
    assert await fake_upstream.async_wait_until(lambda: fake_upstream.cancelled == 1, timeout=2)


async def test_idle_timeout_mid_stream(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, timeouts={"idle": 0.3})
    fake_upstream.tok = 5.0
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))
    got: list[bytes] = []
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="quiet"):
        async for c in reply.chunks():
            got.append(c)
    assert 0.25 < time.monotonic() - t0 < 2
    assert b'"content": "w0"' in b"".join(got)  # the first token came, then silence
    # the connection was dropped, so the upstream stops generating
    assert await fake_upstream.async_wait_until(lambda: fake_upstream.in_flight == 0, timeout=2)
    assert fake_upstream.cancelled == 1


async def test_a_stream_longer_than_the_idle_timeout_is_not_cut(fake_upstream: FakeUpstream,
                                                                 make_upstream: Any) -> None:
    """The idle timeout bounds the gap between chunks, not the stream: one timer is kept for the
    whole stream and moved when it fires early, so it must not fire while tokens keep coming."""
    u = make_upstream(fake_upstream.url, timeouts={"idle": 0.2})
    fake_upstream.tok = 0.05
    fake_upstream.length = 16  # ~0.8 s in all, four idle periods
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))
    t0 = time.monotonic()
    body = b"".join([c async for c in reply.chunks()])
    assert time.monotonic() - t0 > 0.5 and body.rstrip().endswith(b"data: [DONE]")


async def test_a_slow_client_is_not_an_idle_upstream(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    """Time the consumer spends between chunks (a slow client's writes) is not the upstream's."""
    u = make_upstream(fake_upstream.url, timeouts={"idle": 0.2})
    fake_upstream.tok = 0.01
    fake_upstream.length = 6
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))
    got = []
    async for c in reply.chunks():
        got.append(c)
        await asyncio.sleep(0.3)  # longer than the idle timeout, every chunk
    assert b"".join(got).rstrip().endswith(b"data: [DONE]")


async def test_cancelling_a_stream_is_not_a_timeout(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    """A client leaving cancels the reading task: that stays a cancellation, and the upstream
    connection is dropped."""
    u = make_upstream(fake_upstream.url, timeouts={"idle": 5})
    fake_upstream.tok = 5.0
    reply = await u.request("POST", "/chat/completions", orjson.dumps({**CHAT, "stream": True}))

    async def consume() -> None:
        async for _ in reply.chunks():
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake_upstream.async_wait_until(lambda: fake_upstream.cancelled == 1, timeout=2)


async def test_idle_timeout_on_a_slow_body(make_upstream: Any, client: str) -> None:
    """Headers in, body late: ``read`` is bounded by the idle timeout."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 20
        await resp.prepare(request)
        await resp.write(b'{"a": ')
        await asyncio.sleep(3)
        return resp

    async with tiny_server([("POST", "/v1/x", handler)]) as url:
        u = make_upstream(url, timeouts={"idle": 0.3})
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="no body"):
            await u.post_json("/x", {})
        assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------------ error statuses


async def test_error_status_raises_normalised(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, retries=0)
    with pytest.raises(UpstreamStatusError) as info:
        await u.post_json("/chat/completions", {**CHAT, "model": "missing"})
    err = info.value
    assert err.http_status == 404
    assert err.body()["error"] == {"message": "upstream: The model `missing` does not exist.",
                                   "type": "invalid_request_error", "param": None, "code": "model_not_found"}
    fake_upstream.fault = "400"
    with pytest.raises(UpstreamStatusError) as info:
        await u.post_json("/chat/completions", CHAT)
    assert info.value.http_status == 400
    assert info.value.body()["error"]["code"] is None  # never vLLM's integer
    assert info.value.body()["error"]["type"] == "invalid_request_error"
    fake_upstream.fault = "500"
    with pytest.raises(UpstreamStatusError) as info:
        await u.post_json("/chat/completions", CHAT)
    assert info.value.http_status == 500
    assert "injected fault 500" in info.value.message


async def test_error_status_with_an_empty_or_broken_body(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, retries=0)
    fake_upstream.push_response(500, b"")
    with pytest.raises(UpstreamStatusError) as info:
        await u.post_json("/chat/completions", CHAT)
    assert info.value.message == "upstream: upstream answered HTTP 500"
    fake_upstream.push_response(400, b"plain words")
    with pytest.raises(UpstreamStatusError) as info:
        await u.post_json("/chat/completions", CHAT)
    assert info.value.message == "upstream: plain words"


# ------------------------------------------------------------------------ LoRA adapters


async def test_load_and_unload_lora_adapter(fake_upstream: FakeUpstream, make_upstream: Any) -> None:
    u = make_upstream(fake_upstream.url, retries=0)
    await u.load_lora_adapter("tenant-a-v1", "/adapters/a1")
    assert fake_upstream.adapters == {"tenant-a-v1": "/adapters/a1"}
    rec = fake_upstream.requests[-1]
    assert (rec.method, rec.path) == ("POST", "/v1/load_lora_adapter")
    assert rec.json == {"lora_name": "tenant-a-v1", "lora_path": "/adapters/a1"}
    assert "tenant-a-v1" in [c["id"] for c in (await u.get_json("/models"))["data"]]

    with pytest.raises(UpstreamStatusError) as info:
        await u.load_lora_adapter("tenant-a-v1", "/adapters/other")
    assert info.value.http_status == 400 and "already been loaded" in info.value.message
    assert fake_upstream.adapters == {"tenant-a-v1": "/adapters/a1"}

    await u.unload_lora_adapter("tenant-a-v1")
    assert fake_upstream.adapters == {}
    assert fake_upstream.requests[-1].json == {"lora_name": "tenant-a-v1"}
    with pytest.raises(UpstreamStatusError) as info:
        await u.unload_lora_adapter("tenant-a-v1")
    assert info.value.http_status == 404
