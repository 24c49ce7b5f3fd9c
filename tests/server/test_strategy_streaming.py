"""Streamed requests to strategies that must finish before answering (best_of_n): keep-alive
comments while the search runs, then the answer as chunks; a departing client cancels the
search; the deadline and the token budget bound it."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)
HTTP = httpx.Client(timeout=20)  # one client: a new one per request costs more than the request


NO_MEMORY = {"enabled": False}


@pytest.fixture
def make_proxy(make_proxy: Callable[..., ProxyServer]) -> Callable[..., ProxyServer]:
    """Experience memory off: its remember/distil calls reach the fake after the response."""
    return functools.partial(make_proxy, memory=NO_MEMORY)


@pytest.fixture
def proxy(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return make_proxy(fake_upstream.url)

MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]
TRUE = "FINAL VERIFICATION ANSWER: True"
BON = {"name": "best_of_n", "n": 2, "verifiers": ["approval"], "pal": 0}  # prose: the fake writes no programs


def is_verifier(body: dict[str, Any]) -> bool:
    return "strict verifier" in str(body["messages"][0].get("content"))


def script(answers: list[str], on_candidates: Callable[[], None] | None = None) -> Callable[[dict[str, Any], int], str]:
    def fn(body: dict[str, Any], i: int) -> str:
        if is_verifier(body):
            return TRUE
        if i == 0 and on_candidates is not None:
            on_candidates()
        return f"Path {i}. The answer is {answers[i % len(answers)]}."

    return fn


def chat(strategy: Any = BON, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": MESSAGES, "stream": True, "strategy": strategy, **extra}


def sse(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) per SSE event; comments come back as ("comment", text)."""
    out: list[tuple[str | None, bytes]] = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        name, data = None, b""
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                name, data = "comment", line[1:].strip()
            elif line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name, data))
    return out


@pytest.fixture
def slow_proxy(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    """Keep-alive every 0.1 s; each upstream call takes 0.4 s, so a best_of_n run takes ~0.8 s."""
    fake_upstream.ttft = 0.4
    fake_upstream.script(script(["3", "7"]))
    return make_proxy(fake_upstream.url, strategies={"keepalive_s": 0.1})


def test_keepalives_then_the_answer_then_usage(fake_upstream: FakeUpstream, slow_proxy: ProxyServer) -> None:
    arrivals: list[tuple[float, bytes]] = []
    t0 = time.monotonic()
    with HTTP.stream("POST", slow_proxy.url + "/chat/completions", json=chat(trace=True), timeout=10) as r:
        headers_at = time.monotonic() - t0
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for piece in r.iter_raw():
            arrivals.append((time.monotonic() - t0, piece))
    end = time.monotonic() - t0
    assert headers_at < 0.3  # the response starts at once, long before the answer
    assert end > 0.7
    raw = b"".join(p for _, p in arrivals)
    events = sse(raw)
    first_data = next(k for k, (name, _) in enumerate(events) if name != "comment")
    keepalives = events[:first_data]
    assert len(keepalives) >= 4 and all(e == ("comment", b"keep-alive") for e in keepalives)
    assert all(name != "comment" for name, _ in events[first_data:])  # none once the answer flows
    assert arrivals[0][0] < 0.35  # the first keep-alive came early
    assert events[-1] == (None, b"[DONE]")
    chunks = [orjson.loads(d) for _, d in events[first_data:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    *body, tail = chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body)
    assert text.endswith("The answer is 7.") or text.endswith("The answer is 3.")
    assert body[0]["choices"][0]["delta"]["role"] == "assistant"
    assert body[-1]["choices"][0]["finish_reason"] == "stop"
    # the last chunk carries usage (over every upstream call) with no choices, and the summary
    assert tail["choices"] == []
    total = fake_upstream.total_usage()
    assert {k: tail["usage"][k] for k in total} == total
    assert tail["sharpen"]["strategy"] == "best_of_n"
    assert tail["sharpen"]["upstream_calls"] == 3
    assert text == next(c["content"] for c in tail["sharpen"]["trace"]["candidates"] if text == c["content"])
    # upstream calls were never streamed
    assert not any(r.stream for r in fake_upstream.completion_calls())


def test_chosen_answer_matches_the_non_streamed_one(fake_upstream: FakeUpstream, slow_proxy: ProxyServer) -> None:
    fake_upstream.ttft = 0.0
    fake_upstream.script(script(["3", "7", "7", "7"]))
    strategy = {"name": "best_of_n", "n": 4, "verifiers": ["agreement"], "pal": 0}
    body = chat(strategy)
    body["stream"] = False
    expected = HTTP.post(slow_proxy.url + "/chat/completions", json=body, timeout=10).json()
    with HTTP.stream("POST", slow_proxy.url + "/chat/completions", json=chat(strategy), timeout=10) as r:
        raw = b"".join(r.iter_raw())
    chunks = [orjson.loads(d) for name, d in sse(raw) if name is None and d != b"[DONE]"]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text == expected["choices"][0]["message"]["content"]
    assert text.endswith("The answer is 7.")


def test_openai_sdk_stream(fake_upstream: FakeUpstream, slow_proxy: ProxyServer) -> None:
    client = openai.OpenAI(base_url=slow_proxy.url, api_key="unused", max_retries=0, timeout=10)
    stream = client.chat.completions.create(model="fake", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                                            extra_body={"strategy": BON})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text in ("Path 0. The answer is 3.", "Path 1. The answer is 7.")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == fake_upstream.total_usage()["total_tokens"]


def test_client_n_above_strategy_n_is_a_plain_400_even_when_streamed(fake_upstream: FakeUpstream,
                                                                      proxy: ProxyServer) -> None:
    r = HTTP.post(proxy.url + "/chat/completions", json=chat(n=3), timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"
    assert fake_upstream.completion_calls() == []


def _metric(proxy: ProxyServer, name: str) -> float:
    text = HTTP.get(proxy.root + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("phase", ["candidates", "verifiers"])
def test_client_disconnect_cancels_the_upstream_calls(fake_upstream: FakeUpstream,
                                                      make_proxy: Callable[..., ProxyServer], phase: str) -> None:
    proxy = make_proxy(fake_upstream.url, strategies={"keepalive_s": 0.05})
    if phase == "candidates":
        fake_upstream.ttft = 10.0
        expect = 1
    else:
        # the candidates come at once; every call after them (the verifiers) takes 10 s
        fake_upstream.script(script(["3", "7"], on_candidates=lambda: setattr(fake_upstream, "ttft", 10.0)))
        expect = 2
    t0 = time.monotonic()
    with httpx.stream("POST", proxy.url + "/chat/completions", json=chat(), timeout=10) as r:
        assert r.status_code == 200
        assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == expect, timeout=5)
        pieces = r.iter_raw()
        assert next(pieces) == b": keep-alive\n\n"
    # the client has gone: every upstream call in flight is dropped, nothing is left generating
    assert fake_upstream.wait_until(
        lambda: fake_upstream.cancelled == expect and fake_upstream.in_flight == 0, timeout=5
    ), (fake_upstream.cancelled, fake_upstream.in_flight)
    assert time.monotonic() - t0 < 5
    assert len(fake_upstream.completion_calls()) == (1 if phase == "candidates" else 3)
    assert fake_upstream.wait_until(lambda: _metric(proxy, "sharpen_client_disconnects_total") == 1, timeout=3)
    assert _metric(proxy, "sharpen_requests_in_flight") == 0


def test_deadline_non_streamed_is_504(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.ttft = 5.0
    body = chat({"name": "best_of_n", "n": 2, "deadline_s": 0.5})
    body["stream"] = False
    t0 = time.monotonic()
    r = HTTP.post(proxy.url + "/chat/completions", json=body, timeout=10)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert 0.4 < time.monotonic() - t0 < 2.0
    assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 0, timeout=3)


def test_deadline_streamed_is_an_error_event(fake_upstream: FakeUpstream,
                                            make_proxy: Callable[..., ProxyServer]) -> None:
    proxy = make_proxy(fake_upstream.url, strategies={"keepalive_s": 0.1})
    fake_upstream.ttft = 5.0
    t0 = time.monotonic()
    with HTTP.stream("POST", proxy.url + "/chat/completions", timeout=10,
                      json=chat({"name": "best_of_n", "n": 2, "deadline_s": 0.5})) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())
    assert 0.4 < time.monotonic() - t0 < 2.0
    events = sse(raw)
    assert events[-1] == (None, b"[DONE]")
    name, data = events[-2]
    assert name == "error"
    assert orjson.loads(data)["error"]["code"] == "upstream_timeout"
    assert {n for n, _ in events[:-2]} <= {"comment"}
    assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 0, timeout=3)


def test_deadline_during_verification_answers_from_agreement(fake_upstream: FakeUpstream,
                                                             proxy: ProxyServer) -> None:
    fake_upstream.script(script(["3", "7", "7", "7"], on_candidates=lambda: setattr(fake_upstream, "ttft", 5.0)))
    body = chat({"name": "best_of_n", "n": 4, "deadline_s": 0.5, "verifiers": ["approval"], "pal": 0}, trace=True)
    body["stream"] = False
    t0 = time.monotonic()
    r = HTTP.post(proxy.url + "/chat/completions", json=body, timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert r.status_code == 200, r.text
    t = r.json()["sharpen"]["trace"]
    assert t["all_verifiers_failed"] is True
    assert r.json()["choices"][0]["message"]["content"].endswith("The answer is 7.")
    assert all(c["error"] == "deadline" for c in t["calls"] if c["purpose"].startswith("verify:"))
    assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 0, timeout=3)


@pytest.mark.parametrize("stream", [False, True])
def test_small_token_budget_skips_verifiers_and_answers_from_agreement(
        fake_upstream: FakeUpstream, proxy: ProxyServer, stream: bool) -> None:
    fake_upstream.script(script(["3", "7", "7", "7"]))
    aspects = ["approval", "math_steps", "logic_steps", "rederive"]
    body = chat({"name": "best_of_n", "n": 4, "max_upstream_tokens": 10, "verifiers": aspects, "pal": 0}, trace=True)
    body["stream"] = stream
    r = HTTP.post(proxy.url + "/chat/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    if stream:
        events = sse(r.content)
        tail = orjson.loads(events[-2][1])
        text = "".join(orjson.loads(d)["choices"][0]["delta"].get("content") or ""
                       for _, d in events[:-2] if orjson.loads(d)["choices"])
        s = tail["sharpen"]
    else:
        text = r.json()["choices"][0]["message"]["content"]
        s = r.json()["sharpen"]
    assert text.endswith("The answer is 7.")
    t = s["trace"]
    # the candidates call (always allowed) spent the budget; no verifier call reached the upstream
    assert len(fake_upstream.completion_calls()) == 1
    assert t["all_verifiers_failed"] is True
    assert [c["purpose"] for c in t["calls"] if c["ok"]] == ["candidates"]
    for c in t["candidates"]:
        assert all("budget" in (c["verdicts"][f"aspect:{a}"]["error"] or "")
                   for a in aspects)
