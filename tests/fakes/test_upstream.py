"""Tests of the FakeUpstream test double itself: if it lies, every proxy test built on it lies."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from tests.fakes.upstream import VERIFY_SUFFIX, FakeUpstream


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": "what is two plus two"}], **extra}


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, str]]:
    """(arrival time, data) per SSE event, as the bytes come off the socket."""
    buf = b""
    async for piece in resp.content.iter_any():
        buf += piece
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            yield time.monotonic(), event.decode().removeprefix("data: ")


def test_models_health_and_metrics(up: FakeUpstream) -> None:
    with httpx.Client(base_url=up.root_url) as client:
        assert client.get("/health").status_code == 200
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == ["fake"]
        assert models["data"][0]["parent"] is None
        assert 'vllm:num_requests_running{model_name="fake"} 0.0' in client.get("/metrics").text
    assert [r.path for r in up.requests] == ["/health", "/v1/models", "/metrics"]
    assert up.completion_calls() == []


def test_chat_n_choices_answers_and_usage(up: FakeUpstream) -> None:
    up.answers = ["3", "7"]
    with httpx.Client(base_url=up.url) as client:
        out = client.post("/chat/completions", json=chat_body(n=3)).json()
    contents = [c["message"]["content"] for c in out["choices"]]
    assert [c.split()[-1] for c in contents] == ["3.", "7.", "3."]
    assert contents[0] == "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 The answer is 3."
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 48, "total_tokens": 53}
    (rec,) = up.completion_calls()
    assert rec.usage == out["usage"] and rec.status == 200 and rec.json["n"] == 3
    assert up.total_usage() == out["usage"]


def test_max_tokens_script_verifier_and_headers(up: FakeUpstream) -> None:
    with httpx.Client(base_url=up.url) as client:
        capped = client.post("/chat/completions", json=chat_body(max_tokens=3)).json()
        assert capped["choices"][0] == {**capped["choices"][0], "message": {
            "role": "assistant", "content": "w0 w1 w2", "tool_calls": []}, "finish_reason": "length"}
        assert capped["usage"]["completion_tokens"] == 3
        verify = chat_body(messages=[{"role": "user", "content": "Please VERIFY this"}])
        text = client.post("/chat/completions", json=verify).json()["choices"][0]["message"]["content"]
        assert text.endswith("The answer is 42." + VERIFY_SUFFIX)
        short = client.post("/completions", json={"model": "fake", "prompt": "a b", "n": 2},
                            headers={"X-Fake": "len=5"}).json()
        assert [c["text"] for c in short["choices"]] == ["w0 The answer is 42."] * 2
        assert short["usage"] == {"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12}
        up.script(lambda body, i: f"choice {i} of {body.get('n', 1)}")
        scripted = client.post("/chat/completions", json=chat_body(n=2)).json()
        assert [c["message"]["content"] for c in scripted["choices"]] == ["choice 0 of 2", "choice 1 of 2"]
        missing = client.post("/chat/completions", json=chat_body(model="nope"))
        assert missing.status_code == 404
        assert missing.json() == {"error": {"message": "The model `nope` does not exist.",
                                            "type": "NotFoundError", "param": None, "code": 404}}
    assert up.completion_calls()[1].headers["content-type"] == "application/json"


def test_openai_sdk_parses_everything(up: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=up.url, api_key="x", max_retries=0)
    chat = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=3, n=2)
    lp = chat.choices[1].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 16
    assert lp.content[0].token == "w0" and len(lp.content[0].top_logprobs) == 3
    assert lp.content[0].top_logprobs[0].logprob == lp.content[0].logprob <= 0
    comp = client.completions.create(model="fake", prompt="hi", logprobs=2, max_tokens=4)
    clp = comp.choices[0].logprobs
    assert clp is not None and clp.tokens == ["w0", " w1", " w2", " w3"]
    assert clp.text_offset == [0, 2, 5, 8] and clp.top_logprobs is not None
    assert len(clp.top_logprobs[1]) == 2 and " w1" in clp.top_logprobs[1]
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], stream=True, n=2,
        logprobs=True, stream_options={"include_usage": True})
    texts = ["", ""]
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert texts == [chat.choices[0].message.content] * 2
    assert usage is not None and usage.completion_tokens == 32
    cstream = client.completions.create(model="fake", prompt="hi", stream=True, max_tokens=2)
    assert "".join(c.choices[0].text for c in cstream if c.choices) == "w0 w1"


async def test_stream_is_incremental_and_usage_matches(
    up: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    headers = {"X-Fake": "ttft=0.2,tok=0.05,len=6"}
    body = chat_body(stream=True, stream_options={"include_usage": True})
    sent = time.monotonic()
    async with session.post(f"{up.url}/chat/completions", json=body, headers=headers) as resp:
        headers_at = time.monotonic()
        events = [e async for e in sse_events(resp)]
    assert headers_at - sent < 0.15  # stream headers go out before the ttft wait
    assert events[-1][1] == "[DONE]"
    data = [json.loads(d) for _, d in events[:-1]]
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    token_times = [t for (t, _), d in zip(events, data, strict=False) if d["choices"]
                   and d["choices"][0]["delta"].get("content")]
    assert len(token_times) == 6
    assert token_times[0] - sent >= 0.2
    assert token_times[-1] - token_times[0] >= 5 * 0.05 * 0.8  # spread out, not one burst
    assert data[-2]["choices"][0]["finish_reason"] == "stop"
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 6
    assert up.completion_calls()[0].usage == data[-1]["usage"]


async def test_fault_modes(up: FakeUpstream, session: aiohttp.ClientSession) -> None:
    url = f"{up.url}/chat/completions"

    async def post(fault: str, **extra: Any) -> aiohttp.ClientResponse:
        async with session.post(url, json=chat_body(**extra), headers={"X-Fake": f"fault={fault}"}) as r:
            await r.read()
            return r

    with pytest.raises(aiohttp.ClientConnectionError):
        await post("drop")
    assert (await post("500")).status == 500
    assert (await post("503")).status == 503
    async with session.post(url, json=chat_body(), headers={"X-Fake": "fault=garbage"}) as r:
        assert r.status == 200
        with pytest.raises(ValueError):
            json.loads(await r.read())
    with pytest.raises(aiohttp.ClientPayloadError):
        await post("drop_mid")  # non-stream: body shorter than its Content-Length
    async with session.post(url, json=chat_body(stream=True), headers={"X-Fake": "fault=drop_mid"}) as r:
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for piece in r.content.iter_any():
                got += piece
    assert b"[DONE]" not in got and got.count(b"data:") == 1 + 8  # role chunk + half the tokens
    rec = up.completion_calls()[-1]
    assert rec.fault == "drop_mid" and rec.usage is not None and rec.usage["completion_tokens"] == 8
    assert up.cancelled == 0  # the fake's own drops are not client disconnects
    # The attribute applies to completion endpoints only, so polling keeps working.
    up.fault = "503"
    assert (await post("none")).status == 200  # a header overrides the attribute
    async with session.post(url, json=chat_body()) as r:
        assert r.status == 503
    async with session.get(f"{up.url}/models") as r:
        assert r.status == 200


async def test_fail_n_and_pushed_responses(up: FakeUpstream, session: aiohttp.ClientSession) -> None:
    url = f"{up.url}/chat/completions"

    async def status(headers: dict[str, str] | None = None) -> int:
        async with session.post(url, json=chat_body(), headers=headers) as r:
            await r.read()
            return r.status

    up.fail_n = 2
    assert [await status() for _ in range(3)] == [500, 500, 200]
    retry = {"X-Fake": "fail_n=1,len=4"}
    assert [await status(retry) for _ in range(3)] == [500, 200, 200]
    up.push_response(429, {"error": {"message": "slow down", "type": "RateLimitError", "code": 429}})
    assert [await status() for _ in range(2)] == [429, 200]
    assert [r.fault for r in up.completion_calls()] == ["fail_n"] * 2 + ["none", "fail_n"] + ["none"] * 2 + [
        "pushed", "none"]


async def test_client_disconnect_counts_and_metrics(
    up: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    async def running() -> str:
        async with session.get(f"{up.root_url}/metrics") as r:
            return next(line for line in (await r.text()).splitlines()
                        if line.startswith("vllm:num_requests_running"))

    body = chat_body(stream=True)
    resp = await session.post(f"{up.url}/chat/completions", json=body, headers={"X-Fake": "tok=0.2"})
    await resp.content.readuntil(b"\n\n")
    assert up.in_flight == 1
    assert await running() == 'vllm:num_requests_running{model_name="fake"} 1.0'
    resp.close()  # abandon mid-stream
    assert await up.async_wait_until(lambda: up.cancelled == 1 and up.in_flight == 0)
    assert await running() == 'vllm:num_requests_running{model_name="fake"} 0.0'
    rec = up.completion_calls()[0]
    assert rec.cancelled and rec.status == 200
    assert rec.usage is not None and rec.usage["completion_tokens"] < 16
    # A non-stream request is cancelled too when its client gives up while it is being generated.
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(f"{up.url}/chat/completions", json=chat_body(),
                                headers={"X-Fake": "ttft=5"}, timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    assert await up.async_wait_until(lambda: up.cancelled == 2 and up.in_flight == 0)


def test_hang_does_not_block_stop() -> None:
    fake = FakeUpstream().start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(f"{fake.url}/chat/completions", json=chat_body(), headers={"X-Fake": "fault=hang"},
                       timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert fake.wait_until(lambda: fake.in_flight == 1)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 3
    thread.join(timeout=5)
    assert len(errors) == 1 and fake.cancelled == 0
    # A restart keeps the port, so a proxy pointed at it reconnects.
    port = fake.port
    with fake:
        assert fake.port == port and httpx.get(f"{fake.root_url}/health").status_code == 200


def test_lora_load_unload_semantics(up: FakeUpstream) -> None:
    with httpx.Client(base_url=up.url) as client:
        load = client.post("/load_lora_adapter", json={"lora_name": "a1", "lora_path": "/tmp/a1"})
        assert load.status_code == 200 and load.text.startswith("Success")
        again = client.post("/load_lora_adapter", json={"lora_name": "a1", "lora_path": "/tmp/a1b"})
        assert again.status_code == 400 and again.json()["error"]["code"] == 400
        inplace = client.post("/load_lora_adapter",
                              json={"lora_name": "a1", "lora_path": "/tmp/a1b", "load_inplace": True})
        assert inplace.status_code == 200
        base, adapter = client.get("/models").json()["data"]
        assert base["id"] == "fake" and base["parent"] is None
        assert adapter == {**adapter, "id": "a1", "root": "/tmp/a1b", "parent": "fake"}
        assert client.post("/chat/completions", json=chat_body(model="a1")).json()["model"] == "a1"
        assert client.post("/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 200
        gone = client.post("/unload_lora_adapter", json={"lora_name": "a1"})
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"
        assert client.post("/chat/completions", json=chat_body(model="a1")).status_code == 404
    assert up.adapters == {}


async def test_hundreds_of_concurrent_requests(up: FakeUpstream, session: aiohttp.ClientSession) -> None:
    async def one(i: int) -> int:
        body = chat_body(stream=i % 2 == 0, max_tokens=4)
        async with session.post(f"{up.url}/chat/completions", json=body,
                                headers={"X-Fake": "ttft=1.0"}) as r:
            await r.read()
            return r.status

    tasks = [asyncio.create_task(one(i)) for i in range(300)]
    # Most are open at once (a loaded machine may finish a few before the last ones arrive).
    assert await up.async_wait_until(lambda: up.in_flight >= 150, timeout=10)
    assert await asyncio.gather(*tasks) == [200] * 300
    assert up.total_usage()["completion_tokens"] == 300 * 4 and up.in_flight == 0
