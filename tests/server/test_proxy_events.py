"""Finished strategy requests go to the in-process event stream (tenant, strategy, uncertainty)
and to the ``sharpen_uncertainty`` histogram on /metrics.

The proxy runs uvicorn on its own loop in another thread. The test subscribes before any
request and reads the queue only after the response is in: a non-streamed request publishes
before its response is sent; a streamed one right after its last chunk, so that is polled for.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from protocol.events import RequestEvent
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)
HTTP = httpx.Client(timeout=20)  # one client: a new one per request costs more than the request

MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]
KEYS = {"sk-a": "team-a", "sk-b": "team-b"}
SC = {"name": "self_consistency", "n": 4}
BON = {"name": "best_of_n", "n": 4, "verifiers": ["agreement"], "pal": 0}  # prose only: the fake writes no programs


@pytest.fixture
def make_proxy(make_proxy: Callable[..., ProxyServer]) -> Callable[..., ProxyServer]:
    """Experience memory off (it would subscribe too, and call the fake after responses)."""
    return functools.partial(make_proxy, memory={"enabled": False})


@pytest.fixture
def proxy(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    fake_upstream.answers = ["3", "7", "7", "7"]
    return make_proxy(fake_upstream.url, api_keys=KEYS)


@pytest.fixture
def events(proxy: ProxyServer) -> Iterator[asyncio.Queue[RequestEvent]]:
    bus = proxy.app.services.events
    q = bus.subscribe()
    yield q
    bus.unsubscribe(q)


def post(proxy: ProxyServer, key: str, strategy: Any, **extra: Any) -> httpx.Response:
    body = {"model": "fake", "messages": MESSAGES, **extra}
    if strategy is not None:
        body["strategy"] = strategy
    return HTTP.post(proxy.url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=20)


def drain(q: asyncio.Queue[RequestEvent], expect: int, timeout: float = 5.0) -> list[RequestEvent]:
    deadline = time.monotonic() + timeout
    while q.qsize() < expect and time.monotonic() < deadline:
        time.sleep(0.01)
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def metrics(proxy: ProxyServer) -> dict[str, float]:
    text = HTTP.get(proxy.root + "/metrics", headers={"Authorization": "Bearer sk-a"}, timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("sharpen_uncertainty"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_each_strategy_request_publishes_an_event(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                  events: asyncio.Queue[RequestEvent]) -> None:
    r1 = post(proxy, "sk-a", SC)
    r2 = post(proxy, "sk-b", BON)
    assert r1.status_code == r2.status_code == 200
    got = drain(events, 2)
    assert len(got) == 2
    for ev, r, tenant, strategy in ((got[0], r1, "team-a", "self_consistency"), (got[1], r2, "team-b", "best_of_n")):
        body = r.json()
        assert ev.tenant == tenant
        assert ev.strategy == strategy
        assert ev.model == "fake"
        assert ev.request_id == body["id"]
        assert ev.answer == body["choices"][0]["message"]["content"]
        assert ev.messages == MESSAGES
        assert ev.uncertainty is not None
        assert round(ev.uncertainty.score, 4) == body["sharpen"]["uncertainty"]
        assert ev.usage == body["usage"]
    assert got[0].uncertainty is not None and got[0].uncertainty.score == pytest.approx(0.25)
    assert got[0].uncertainty.agreement == pytest.approx(0.75)
    # The candidates drawn go with the event, so adaptation can label with them instead of drawing again.
    assert sorted(s.answer or "" for s in got[0].samples) == ["3", "7", "7", "7"]
    assert all(s.finish_reason == "stop" and s.logprob is not None and not s.program for s in got[0].samples)
    assert any("The answer is 3." in s.content for s in got[0].samples)
    assert len(got[1].samples) == 4


def test_drafts_and_refinements_are_not_samples(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                events: asyncio.Queue[RequestEvent]) -> None:
    """critique_refine's candidates are conditioned on critiques: no labeller may count them as votes."""
    assert post(proxy, "sk-a", {"name": "critique_refine", "max_rounds": 1}).status_code == 200
    (ev,) = drain(events, 1)
    assert ev.strategy == "critique_refine" and ev.uncertainty is not None and ev.samples == []


def test_streamed_request_publishes_too(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                        events: asyncio.Queue[RequestEvent]) -> None:
    r = post(proxy, "sk-a", BON, stream=True)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    (ev,) = drain(events, 1)
    assert ev.strategy == "best_of_n" and ev.tenant == "team-a"
    assert ev.answer is not None and ev.answer.endswith("The answer is 7.")
    assert ev.uncertainty is not None


def test_failed_requests_publish_nothing(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                         events: asyncio.Queue[RequestEvent]) -> None:
    assert post(proxy, "sk-a", {"name": "self_consistency", "n": 0}).status_code == 400
    fake_upstream.fault = "500"
    assert post(proxy, "sk-a", SC).status_code == 500
    fake_upstream.fault = "none"
    assert post(proxy, "sk-a", SC).status_code == 200  # a marker: the one event that must arrive
    got = drain(events, 1)
    assert [e.strategy for e in got] == ["self_consistency"]


def test_uncertainty_histogram_on_metrics(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                          events: asyncio.Queue[RequestEvent]) -> None:
    before = metrics(proxy)
    assert not any(k.startswith("sharpen_uncertainty_count") for k in before)  # nothing observed yet
    scores = [post(proxy, "sk-a", SC).json()["sharpen"]["uncertainty"] for _ in range(2)]
    scores.append(post(proxy, "sk-b", BON).json()["sharpen"]["uncertainty"])
    post(proxy, "sk-a", None)  # passthrough: no uncertainty to observe
    m = metrics(proxy)
    assert m['sharpen_uncertainty_count{strategy="self_consistency"}'] == 2
    assert m['sharpen_uncertainty_sum{strategy="self_consistency"}'] == pytest.approx(sum(scores[:2]), abs=1e-3)
    assert m['sharpen_uncertainty_count{strategy="best_of_n"}'] == 1
    assert m['sharpen_uncertainty_bucket{le="0.3",strategy="self_consistency"}'] == 2  # 0.25 each
    assert m['sharpen_uncertainty_bucket{le="0.2",strategy="self_consistency"}'] == 0
    assert m['sharpen_uncertainty_bucket{le="+Inf",strategy="best_of_n"}'] == 1
    assert not any('strategy="passthrough"' in k for k in m)
