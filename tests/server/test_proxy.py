"""The proxy end to end against the fake upstream: passthrough with the real OpenAI SDK, what reaches
the upstream, model listing, metrics, health and readiness."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from strategies.base import AnyRequest, Strategy, StrategyContext, StrategyResult
from strategies.passthrough import Passthrough
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("isolated_data")]


MESSAGES = [{"role": "user", "content": "what is two plus two"}]
VLLM_EXTRAS: dict[str, Any] = {
    "top_k": 7,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "structured_outputs": {"choice": ["yes", "no"]},
    "cache_salt": "salt-123",
    "chat_template_kwargs": {"enable_thinking": False},
}


class Echo(Strategy):
    """A second strategy, so the ``model@strategy`` variants have something to list."""

    name = "echo"

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        body = {"echo": {"model": ctx.model, "tenant": ctx.tenant, "strategy": self.name}}
        return StrategyResult(raw=orjson.dumps(body))


def sdk(p: ProxyServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url, api_key=key, max_retries=0, timeout=10)


def last_call(up: FakeUpstream) -> Any:
    calls = up.completion_calls()
    assert calls, "nothing reached the upstream"
    return calls[-1]


def metric_samples(p: ProxyServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(p.root + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ------------------------------------------------------------------------ passthrough via the SDK


def test_chat_non_stream_via_sdk(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    resp = sdk(proxy).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=50, temperature=0.3,
                                              seed=4)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == fake_upstream.default_content({"messages": MESSAGES}, 0)
    assert resp.choices[0].finish_reason == "stop"
    rec = last_call(fake_upstream)
    assert resp.usage is not None and resp.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                      "total_tokens"}) == rec.usage
    assert rec.path == "/v1/chat/completions"
    assert rec.json == {"model": "fake", "messages": MESSAGES, "max_tokens": 50, "temperature": 0.3, "seed": 4}


def test_non_stream_answer_is_byte_for_byte(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    raw = b'{"id":"x",  "object":"chat.completion","choices":[],"custom":{"kept":true},"usage":null}'
    fake_upstream.push_response(200, raw)
    r = httpx.post(proxy.url + "/chat/completions", json={"model": "fake", "messages": MESSAGES}, timeout=5)
    assert r.status_code == 200
    assert r.content == raw


def test_chat_stream_via_sdk(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    stream = sdk(proxy).chat.completions.create(model="fake", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                                                stream_options={"include_usage": True})
    text, usage = [], None
    for chunk in stream:
        for c in chunk.choices:
            text.append(c.delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(text) == fake_upstream.default_content({"messages": MESSAGES}, 0)
    rec = last_call(fake_upstream)
    assert rec.stream
    assert usage is not None and usage.completion_tokens == rec.usage["completion_tokens"] == 16


def test_completions_non_stream_and_stream_via_sdk(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    client = sdk(proxy)
    expected = fake_upstream.default_content({"prompt": "2+2="}, 0)
    resp = client.completions.create(model="fake", prompt="2+2=", max_tokens=30, logprobs=2)
    assert resp.choices[0].text == expected
    assert resp.choices[0].logprobs is not None and len(resp.choices[0].logprobs.tokens or []) == 16
    rec = last_call(fake_upstream)
    assert rec.path == "/v1/completions"
    assert rec.json == {"model": "fake", "prompt": "2+2=", "max_tokens": 30, "logprobs": 2}

    pieces = [c.choices[0].text for c in client.completions.create(model="fake", prompt="2+2=", stream=True)
              if c.choices]
    assert "".join(pieces) == expected
    assert len(pieces) == 16  # one event per token: relayed, not re-chunked
    assert last_call(fake_upstream).path == "/v1/completions"


# ------------------------------------------------------------------------ what reaches the upstream


@pytest.mark.parametrize("stream", [False, True])
def test_chat_body_reaches_upstream_unchanged_but_model(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                        stream: bool) -> None:
    body: dict[str, Any] = {
        "model": "fake@passthrough",  # a strategy suffix: the upstream only sees the base model
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "u1"}],
        "logprobs": True,
        "top_logprobs": 3,
        "stream": stream,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "user": "someone",
        **VLLM_EXTRAS,
    }
    own = {"strategy": "passthrough", "trace": True, "memory": False}
    r = httpx.post(proxy.url + "/chat/completions", json={**body, **own}, timeout=10)
    assert r.status_code == 200, r.text
    sent = last_call(fake_upstream).json
    assert sent == {**body, "model": "fake"}
    assert not set(own) & set(sent)


def test_completions_body_reaches_upstream_unchanged(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    body = {"model": "fake", "prompt": ["a b", "c"], "echo": False, "logprobs": 1, "suffix": None,
            "best_of": 1, **VLLM_EXTRAS}
    r = httpx.post(proxy.url + "/completions", json={**body, "strategy": "passthrough"}, timeout=10)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    assert last_call(fake_upstream).json == body


def test_missing_model_maps_to_the_upstream_default(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = httpx.post(proxy.url + "/chat/completions", json={"messages": MESSAGES}, timeout=5)
    assert r.status_code == 200, r.text
    assert last_call(fake_upstream).json == {"model": "fake", "messages": MESSAGES}


def test_adapter_loaded_behind_sharpens_back_resolves(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    time.sleep(1.05)  # past the registry's refresh rate limit
    fake_upstream.adapters["late-lora"] = "/adapters/late"
    r = httpx.post(proxy.url + "/chat/completions", json={"model": "late-lora", "messages": MESSAGES}, timeout=5)
    assert r.status_code == 200, r.text
    assert last_call(fake_upstream).model == "late-lora"


def test_upstream_key_is_sent_not_the_clients(fake_upstream: FakeUpstream,
                                              make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, upstream={"api_key": "upstream-secret"}, api_keys={"sk-client": "t"})
    r = httpx.post(p.url + "/chat/completions", json={"model": "fake", "messages": MESSAGES},
                   headers={"Authorization": "Bearer sk-client", "X-Fake": "fault=500"}, timeout=5)
    assert r.status_code == 200, r.text
    headers = last_call(fake_upstream).headers
    assert headers["authorization"] == "Bearer upstream-secret"
    assert "x-fake" not in headers  # client headers are not forwarded


# ------------------------------------------------------------------------ headers, errors


@pytest.mark.parametrize("stream", [False, True])
def test_overhead_header(proxy: ProxyServer, stream: bool) -> None:
    with httpx.stream("POST", proxy.url + "/chat/completions",
                      json={"model": "fake", "messages": MESSAGES, "stream": stream}, timeout=5) as r:
        assert r.status_code == 200
        value = r.headers["x-sharpen-overhead-ms"]
        r.read()
    ms = float(value)
    assert 0 <= ms < 1000
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.content.endswith(b"data: [DONE]\n\n")


def test_unknown_model_is_404_model_not_found(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk(proxy).chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert info.value.type == "invalid_request_error"
    assert fake_upstream.completion_calls() == []


# ------------------------------------------------------------------------ /v1/models


def test_models_lists_upstream_models_and_strategy_variants(fake_upstream: FakeUpstream,
                                                            make_proxy: Callable[..., ProxyServer],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.services.builtin_strategies", lambda: [Passthrough, Echo])
    fake_upstream.adapters["lora-a"] = "/adapters/a"
    p = make_proxy(fake_upstream.url)
    fake_upstream.adapters["lora-b"] = "/adapters/b"  # loaded after start: /v1/models refreshes
    models = sdk(p).models.list().data
    cards = {m.id: m.model_dump() for m in models}
    assert set(cards) == {"fake", "lora-a", "lora-b", "fake@echo", "lora-a@echo", "lora-b@echo"}
    assert cards["fake"]["parent"] is None
    assert cards["lora-a"]["parent"] == "fake" and cards["lora-a"]["root"] == "/adapters/a"
    assert cards["fake@echo"]["parent"] == "fake" and cards["fake@echo"]["owned_by"] == "sharpen"
    assert cards["lora-a@echo"]["parent"] == "lora-a"
    assert all(c["object"] == "model" for c in cards.values())

    # and a listed variant is usable: the suffix picks the strategy, the prefix the model
    r = httpx.post(p.url + "/chat/completions", json={"model": "lora-b@echo", "messages": MESSAGES}, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json() == {"echo": {"model": "lora-b", "tenant": "default", "strategy": "echo"}}


def test_model_with_unknown_suffix_is_not_a_strategy(proxy: ProxyServer) -> None:
    r = httpx.post(proxy.url + "/chat/completions", json={"model": "fake@nosuch", "messages": MESSAGES}, timeout=5)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------------ /metrics


def test_metrics_count_requests_and_tokens(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    client = sdk(proxy)
    client.chat.completions.create(model="fake", messages=MESSAGES)  # type: ignore[arg-type]
    for _ in client.chat.completions.create(model="fake", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                                           stream_options={"include_usage": True}):
        pass
    client.completions.create(model="fake", prompt="one two three")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]

    spent = fake_upstream.total_usage()
    assert spent["prompt_tokens"] > 0 and spent["completion_tokens"] == 48

    def chat_200() -> float:
        return metric_samples(proxy).get(
            ("sharpen_requests_total", (("endpoint", "/chat/completions"), ("status", "200"),
                                        ("strategy", "passthrough"))), 0.0)

    deadline = time.monotonic() + 3  # a stream's metrics are recorded as it closes
    while chat_200() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    m = metric_samples(proxy)
    assert chat_200() == 2
    assert m[("sharpen_requests_total", (("endpoint", "/completions"), ("status", "200"),
                                         ("strategy", "passthrough")))] == 1
    assert m[("sharpen_tokens_total", (("kind", "prompt"),))] == spent["prompt_tokens"]
    assert m[("sharpen_tokens_total", (("kind", "completion"),))] == spent["completion_tokens"]
    # per model: admin only (here, with no keys, everyone is the admin)
    assert m[("sharpen_model_tokens_total", (("kind", "prompt"), ("model", "fake")))] == spent["prompt_tokens"]
    assert m[("sharpen_model_tokens_total", (("kind", "completion"), ("model", "fake")))] == spent["completion_tokens"]
    assert m[("sharpen_requests_in_flight", ())] == 0
    assert m[("sharpen_upstream_calls_total", (("purpose", "answer"),))] == 3
    assert m[("sharpen_request_duration_seconds_count", (("endpoint", "/chat/completions"),
                                                         ("strategy", "passthrough")))] == 2
    assert m[("sharpen_overhead_seconds_count", (("endpoint", "/chat/completions"),))] == 2


def test_metrics_count_refused_requests(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    def count(status: str, strategy: str) -> float:
        return metric_samples(proxy).get(("sharpen_requests_total", (("endpoint", "/chat/completions"),
                                                                     ("status", status), ("strategy", strategy))), 0.0)

    before = {k: count(*k) for k in (("404", "passthrough"), ("400", "none"), ("400", "self_consistency"))}
    url = proxy.url + "/chat/completions"
    assert httpx.post(url, json={"model": "nope", "messages": MESSAGES}, timeout=5).status_code == 404
    assert httpx.post(url, json={"model": "fake", "messages": MESSAGES, "strategy": "nosuch"},
                      timeout=5).status_code == 400
    assert httpx.post(url, json={"model": "fake", "messages": MESSAGES, "n": 4,  # more choices than it draws
                                 "strategy": {"name": "self_consistency", "n": 2}}, timeout=5).status_code == 400
    assert httpx.post(url, content=b"{not json", headers={"content-type": "application/json"},
                      timeout=5).status_code == 400
    assert count("404", "passthrough") == before[("404", "passthrough")] + 1
    assert count("400", "none") == before[("400", "none")] + 2  # no strategy was chosen yet
    assert count("400", "self_consistency") == before[("400", "self_consistency")] + 1
    assert fake_upstream.completion_calls() == []
    assert metric_samples(proxy)[("sharpen_requests_in_flight", ())] == 0


def test_metrics_in_flight_gauge_while_a_request_runs(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.ttft = 1.0
    t = threading.Thread(target=lambda: httpx.post(proxy.url + "/chat/completions",
                                                   json={"model": "fake", "messages": MESSAGES}, timeout=10))
    t.start()
    try:
        assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 1, timeout=3)
        assert metric_samples(proxy)[("sharpen_requests_in_flight", ())] == 1
    finally:
        t.join()
    assert metric_samples(proxy)[("sharpen_requests_in_flight", ())] == 0


# ------------------------------------------------------------------------ /health and /ready


TRACE_FIELDS = {"options", "candidates", "calls", "uncertainty", "notes", "wall_seconds"}  # README, "Strategies"


def test_the_trace_carries_only_documented_fields(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    """Server bookkeeping (whether to remember, the model acquired for routing) stays inside."""
    fake_upstream.answers = ["The answer is 4."]
    r = httpx.post(proxy.url + "/chat/completions", timeout=20, json={
        "messages": MESSAGES, "strategy": {"name": "self_consistency", "n": 2}, "trace": True,
        "memory": {"recall": True, "remember": True}})
    assert r.status_code == 200, r.text
    trace = r.json()["sharpen"]["trace"]
    assert set(trace) == TRACE_FIELDS | {"memory", "majority_answer", "answers_parsed", "waves", "stopped_early",
                                          "split"}
    assert trace["memory"] == []  # recall ran and found nothing yet


def test_health(proxy: ProxyServer) -> None:
    r = httpx.get(proxy.root + "/health", timeout=5)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_ready_follows_the_upstream(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = httpx.get(proxy.root + "/ready", timeout=5)
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert r.json()["upstream"] == fake_upstream.url
    fake_upstream.stop()
    deadline = time.monotonic() + 5  # the probe result is cached for a second
    while time.monotonic() < deadline:
        r = httpx.get(proxy.root + "/ready", timeout=5)
        if r.status_code != 200:
            break
        time.sleep(0.1)
    assert r.status_code == 503
    assert r.json()["status"] != "ready"
    assert httpx.get(proxy.root + "/health", timeout=5).status_code == 200  # liveness is not readiness
    m = metric_samples(proxy)
    assert m[("sharpen_upstream_ready", ())] == 0

