"""Streaming as clients see it: chunks relayed as they come, usage passed on, a broken upstream
reported in-band, and a departing client cancelling the upstream work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from server.streaming import DEPARTURE, ClientGone, Departure, UsageSniffer, cancel_on_disconnect
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("isolated_data")]


MESSAGES = [{"role": "user", "content": "what is two plus two"}]
CLIENTS = ["h1", "aiohttp", "httpx"]


def chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": MESSAGES, "stream": stream, **extra}


def events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) per SSE event."""
    out = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        name, data = None, b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name, data))
    return out


def test_first_chunk_arrives_long_before_the_end(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.tok = 0.15
    fake_upstream.length = 10  # about 1.35 s of generation after the first token
    arrivals: list[tuple[float, bytes]] = []
    t0 = time.monotonic()
    with httpx.stream("POST", proxy.url + "/chat/completions", json=chat(), timeout=10) as r:
        assert r.status_code == 200
        for piece in r.iter_raw():
            arrivals.append((time.monotonic() - t0, piece))
    end = time.monotonic() - t0
    first_token = next(t for t, piece in arrivals if b'"content": "w0"' in piece)
    assert end - first_token > 1.0, arrivals
    # chunks come in as many pieces as the upstream produced them, not buffered into one
    assert len(arrivals) >= 8
    assert b"".join(p for _, p in arrivals).endswith(b"data: [DONE]\n\n")


def test_sdk_stream_yields_before_the_end(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.tok = 0.08
    fake_upstream.length = 10
    client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    t0 = time.monotonic()
    seen: list[float] = []
    for chunk in client.chat.completions.create(model="fake", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append(time.monotonic() - t0)
    assert len(seen) == 10
    assert seen[-1] - seen[0] > 0.5


@pytest.mark.parametrize("endpoint", ["/chat/completions", "/completions"])
def test_stream_usage_chunk_passes_through(fake_upstream: FakeUpstream, proxy: ProxyServer, endpoint: str) -> None:
    body: dict[str, Any] = chat(stream_options={"include_usage": True})
    if endpoint == "/completions":
        del body["messages"]
        body["prompt"] = "two plus two"
    r = httpx.post(proxy.url + endpoint, json=body, timeout=10)
    assert r.status_code == 200
    evs = events(r.content)
    assert evs[-1] == (None, b"[DONE]")
    last = orjson.loads(evs[-2][1])
    assert last["choices"] == []
    assert last["usage"] == fake_upstream.completion_calls()[-1].usage
    assert last["usage"]["completion_tokens"] == 16


def test_no_usage_chunk_unless_asked(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = httpx.post(proxy.url + "/chat/completions", json=chat(), timeout=10)
    assert b'"usage"' not in r.content
    assert "stream_options" not in fake_upstream.completion_calls()[-1].json


@pytest.mark.parametrize("client", CLIENTS)
def test_mid_stream_cut_becomes_an_sse_error_event(fake_upstream: FakeUpstream,
                                                   make_proxy: Callable[..., ProxyServer], client: str) -> None:
    p = make_proxy(fake_upstream.url, upstream={"client": client})
    fake_upstream.fault = "drop_mid"
    t0 = time.monotonic()
    r = httpx.post(p.url + "/chat/completions", json=chat(), timeout=10)
    assert time.monotonic() - t0 < 5
    assert r.status_code == 200  # the status line was sent before the cut
    evs = events(r.content)
    assert any(name is None and b'"content": "w0"' in data for name, data in evs)  # the first half came through
    assert evs[-1] == (None, b"[DONE]")
    name, data = evs[-2]
    assert name == "error"
    err = orjson.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "upstream_error" and err["code"] == "bad_gateway"
    assert isinstance(err["message"], str) and err["message"]
    assert len(fake_upstream.completion_calls()) == 1


def test_mid_stream_cut_raises_in_the_sdk(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.fault = "drop_mid"
    client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="fake", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert got and len(got) < 16
    assert "upstream" in info.value.message


def test_mid_stream_idle_timeout_becomes_an_sse_error_event(fake_upstream: FakeUpstream,
                                                            make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, upstream={"timeouts": {"idle": 0.3}})
    fake_upstream.tok = 5.0
    t0 = time.monotonic()
    r = httpx.post(p.url + "/chat/completions", json=chat(), timeout=10)
    assert time.monotonic() - t0 < 3
    name, data = events(r.content)[-2]
    assert name == "error"
    assert orjson.loads(data)["error"]["code"] == "upstream_timeout"
    assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 0, timeout=2)
    assert fake_upstream.cancelled == 1  # the upstream request was dropped, not left generating


@pytest.mark.parametrize("client", CLIENTS)
def test_client_disconnect_mid_stream_cancels_upstream(fake_upstream: FakeUpstream,
                                                       make_proxy: Callable[..., ProxyServer], client: str) -> None:
    p = make_proxy(fake_upstream.url, upstream={"client": client})
    fake_upstream.tok = 0.1
    fake_upstream.length = 100  # ten seconds, if nobody cancels it
    with httpx.stream("POST", p.url + "/chat/completions", json=chat(), timeout=10) as r:
        it = r.iter_raw()
        got = b""
        while b'w1"' not in got:
            got += next(it)
        assert fake_upstream.in_flight == 1
    t_closed = time.monotonic()
    assert fake_upstream.wait_until(lambda: fake_upstream.cancelled == 1 and fake_upstream.in_flight == 0,
                                    timeout=2), (fake_upstream.cancelled, fake_upstream.in_flight)
    assert time.monotonic() - t_closed < 1.5
    rec = fake_upstream.completion_calls()[0]
    assert rec.cancelled and rec.usage is not None and rec.usage["completion_tokens"] < 20
    m = httpx.get(p.root + "/metrics", timeout=5).text
    assert "sharpen_client_disconnects_total 1.0" in m
    assert "sharpen_requests_in_flight 0.0" in m


@pytest.mark.parametrize("client", CLIENTS)
def test_client_timeout_on_non_stream_cancels_upstream(fake_upstream: FakeUpstream,
                                                       make_proxy: Callable[..., ProxyServer], client: str) -> None:
    p = make_proxy(fake_upstream.url, upstream={"client": client})
    fake_upstream.ttft = 10.0  # non-streamed: no headers for ten seconds
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(p.url + "/chat/completions", json=chat(stream=False), timeout=httpx.Timeout(5, read=0.5))
    t_gone = time.monotonic()
    assert fake_upstream.wait_until(lambda: fake_upstream.cancelled == 1 and fake_upstream.in_flight == 0,
                                    timeout=2), (fake_upstream.cancelled, fake_upstream.in_flight)
    assert time.monotonic() - t_gone < 1.5
    assert fake_upstream.completion_calls()[0].cancelled


def test_client_gone_on_non_stream_is_counted_as_499(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.ttft = 10.0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + "/chat/completions", json=chat(stream=False), timeout=httpx.Timeout(5, read=0.3))
    deadline = time.monotonic() + 2
    while "sharpen_requests_in_flight 0.0" not in (m := httpx.get(proxy.root + "/metrics", timeout=5).text):
        assert time.monotonic() < deadline, m
        time.sleep(0.02)
    assert 'status="500"' not in m
    assert 'sharpen_requests_total{endpoint="/chat/completions",status="499",strategy="passthrough"} 1.0' in m
    assert "sharpen_client_disconnects_total 1.0" in m


def test_streams_do_not_share_state(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    """Two concurrent streams each get their own, complete answer."""
    import concurrent.futures

    fake_upstream.tok = 0.02
    fake_upstream.script(lambda body, i: " ".join(f"{body['messages'][0]['content']}{k}" for k in range(8)))

    def one(tag: str) -> bytes:
        body = {"model": "fake", "messages": [{"role": "user", "content": tag}], "stream": True}
        return httpx.post(proxy.url + "/chat/completions", json=body, timeout=10).content

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        a, b = ex.map(one, ["a", "b"])
    for raw, tag in ((a, "a"), (b, "b")):
        text = "".join(
            c["delta"].get("content") or ""
            for name, data in events(raw) if data != b"[DONE]"
            for c in orjson.loads(data)["choices"]
        )
        assert text == " ".join(f"{tag}{k}" for k in range(8))


# ------------------------------------------------------------------------ UsageSniffer


@pytest.mark.parametrize("sep", [b":", b": "])
def test_usage_sniffer_finds_usage_compact_or_spaced(sep: bytes) -> None:
    s = UsageSniffer()
    for chunk in (b'data: {"choices":[{"delta":{"content":"x"}}],"usage"' + sep + b"null}\n\n",
                  b'data: {"choices":[],"usage"' + sep + b'{"prompt_tokens":3,"completion_tokens":4,'
                  b'"total_tokens":7}}\n\n',
                  b"data: [DONE]\n\n"):
        s.feed(chunk)
    assert s.usage() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_usage_sniffer_handles_a_split_event_and_none() -> None:
    s = UsageSniffer()
    s.feed(b'data: {"choices":[],"usa')
    s.feed(b'ge":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\ndata: [DONE]\n\n')
    assert s.usage() == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    empty = UsageSniffer()
    empty.feed(b'data: {"choices":[]}\n\n')
    assert empty.usage() is None


# ------------------------------------------------------------------ cancel_on_disconnect, both ways


async def test_a_departure_told_by_the_connection_cancels_the_work() -> None:
    departure = Departure()
    scope = {DEPARTURE: departure}
    cancelled = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "done"

    async def never() -> dict[str, Any]:
        raise AssertionError("receive is not read when the connection tells")

    asyncio.get_running_loop().call_later(0.05, departure.fire)
    with pytest.raises(ClientGone):
        await cancel_on_disconnect(never, work(), scope)
    assert cancelled.is_set() and departure.task is None
    already = Departure()
    already.fire()  # gone before the work began: it ends at its first await
    with pytest.raises(ClientGone):
        await cancel_on_disconnect(never, work(), {DEPARTURE: already})


async def test_without_a_departure_a_watcher_reads_receive() -> None:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    with pytest.raises(ClientGone):
        await cancel_on_disconnect(receive, asyncio.sleep(10))
    assert await cancel_on_disconnect(receive, asyncio.sleep(0, result="fine")) == "fine"
