"""Several upstream replicas (server/pool.py) against two fake upstreams: spread, prefix affinity
and per-request pinning, failover with 0 failed requests, /ready and metrics per replica, all
replicas down, bad lists at start, backoff, and adapters on every replica (loaded, reloaded on a
replica that comes back before it takes adapter traffic, never routed where missing, unloaded)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.pool import UpstreamPool
from server.redact import redact_url as public_url
from server.replica import prefix_key
from server.settings import UpstreamSettings
from tests.adapt.test_service import FakeTrainer, GateScript
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer, free_port
from tests.server.test_admin_adaptation import body, wait_job

FAST = {"health_interval_s": 0.1, "backoff_s": 0.1, "backoff_max_s": 0.4, "timeouts": {"connect": 2}}


@pytest.fixture
def pair() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with FakeUpstream() as a, FakeUpstream() as b:
        yield a, b


def pool_proxy(make_proxy: Callable[..., ProxyServer], urls: list[str], **settings: Any) -> ProxyServer:
    return make_proxy(None, upstream={"urls": urls, **FAST}, **settings)


def chat(p: ProxyServer, content: str, *, system: str | None = None, **extra: Any) -> httpx.Response:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return httpx.post(p.url + "/chat/completions", json={"model": "fake", "messages": msgs, "max_tokens": 8, **extra},
                      timeout=30)


def calls(fake: FakeUpstream) -> int:
    return len(fake.completion_calls())


async def burst(p: ProxyServer, n: int, *, stream: bool = False, system: str | None = None) -> list[Any]:
    sem = asyncio.Semaphore(8)
    fails: list[Any] = []
    async with httpx.AsyncClient(timeout=30) as c:
        async def one(i: int) -> None:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": f"q{i}"}]
            async with sem:
                r = await c.post(p.url + "/chat/completions", json={"model": "fake", "messages": msgs,
                                                                      "max_tokens": 8, "stream": stream})
                if r.status_code != 200 or ("data: [DONE]" not in r.text if stream else "choices" not in r.json()):
                    fails.append((r.status_code, r.text[:200]))
        await asyncio.gather(*(one(i) for i in range(n)))
    return fails


def test_requests_spread_over_the_replicas(pair: tuple[FakeUpstream, FakeUpstream],
                                           make_proxy: Callable[..., ProxyServer]) -> None:
    a, b = pair
    p = pool_proxy(make_proxy, [a.url, b.url])
    assert asyncio.run(burst(p, 120)) == []
    print("spread", calls(a), calls(b))
    assert min(calls(a), calls(b)) >= 30


def test_one_strategy_request_stays_on_one_replica(pair: tuple[FakeUpstream, FakeUpstream],
                                                   make_proxy: Callable[..., ProxyServer]) -> None:
    a, b = pair
    # memory off: its background call after each answer is an independent call, free to go anywhere
    p = pool_proxy(make_proxy, [a.url, b.url], memory={"enabled": False})
    for i in range(6):
        a.clear()
        b.clear()
        r = chat(p, f"What is {i} + 2?", strategy={"name": "best_of_n", "n": 3,
                                                    "verifiers": ["approval", "math_steps"]})
        assert r.status_code == 200, r.text
        got = (calls(a), calls(b))
        assert sorted(got)[0] == 0 and sorted(got)[1] >= 3, got  # candidates and verifiers: one replica


def test_a_shared_prompt_prefix_meets_on_one_replica(pair: tuple[FakeUpstream, FakeUpstream],
                                                     make_proxy: Callable[..., ProxyServer]) -> None:
    a, b = pair
    p = pool_proxy(make_proxy, [a.url, b.url])
    for i in range(10):  # sequential: the preferred replica never has more in flight than the other
        assert chat(p, f"question {i}", system="You are the long shared system prompt.").status_code == 200
    assert sorted((calls(a), calls(b))) == [0, 10]
    key = prefix_key({"messages": [{"role": "system", "content": "You are the long shared system prompt."}]})
    assert key == prefix_key({"messages": [{"role": "system", "content": "You are the long shared system prompt."},
                                           {"role": "user", "content": "something else"}]})


def test_a_busy_prefix_replica_spills_to_the_other(pair: tuple[FakeUpstream, FakeUpstream],
                                                   make_proxy: Callable[..., ProxyServer]) -> None:
    # One shared prefix: every prompt prefers the same replica, until it holds more than
    # affinity_slack (4) requests beyond the other; 8 slow requests at a time must overflow.
    a, b = pair
    a.ttft = b.ttft = 0.3
    p = pool_proxy(make_proxy, [a.url, b.url])
    assert asyncio.run(burst(p, 16, system="You are the long shared system prompt.")) == []
    home, other = sorted((calls(a), calls(b)), reverse=True)
    print("spill", home, other)
    assert home + other == 16 and other >= 2 and home > other


def test_a_dead_replica_costs_no_request(pair: tuple[FakeUpstream, FakeUpstream],
                                         make_proxy: Callable[..., ProxyServer]) -> None:
    a, b = pair
    p = pool_proxy(make_proxy, [a.url, b.url])
    assert asyncio.run(burst(p, 20)) == []
    b.stop()
    assert asyncio.run(burst(p, 60)) == [] and asyncio.run(burst(p, 30, stream=True)) == []
    r = httpx.get(p.root + "/ready", timeout=10)
    assert r.status_code == 200
    states = {s["url"]: s for s in r.json()["replicas"]}
    assert states[public_url(a.url)]["state"] == "up" and states[public_url(b.url)]["state"] == "down"
    assert states[public_url(b.url)]["error"]
    metrics = httpx.get(p.root + "/metrics", timeout=10).text
    assert f'sharpen_replica_up{{replica="{public_url(b.url)}"}} 0.0' in metrics
    assert f'sharpen_replica_calls_total{{outcome="ok",replica="{public_url(a.url)}"}}' in metrics
    assert f'sharpen_replica_calls_total{{outcome="failed",replica="{public_url(b.url)}"}}' in metrics


def test_a_replica_failing_mid_load_is_failed_over(pair: tuple[FakeUpstream, FakeUpstream],
                                                   make_proxy: Callable[..., ProxyServer]) -> None:
    a, b = pair
    p = pool_proxy(make_proxy, [a.url, b.url])
    b.fault = "drop"  # connections dropped before the headers: nothing reached the client
    assert asyncio.run(burst(p, 40)) == []
    b.fault = "503"
    assert asyncio.run(burst(p, 40)) == []
    assert calls(a) >= 80


def test_all_replicas_down_is_a_502_within_the_connect_timeout(pair: tuple[FakeUpstream, FakeUpstream],
                                                                make_proxy: Callable[..., ProxyServer]) -> None:
    a, b = pair
    p = pool_proxy(make_proxy, [a.url, b.url])
    a.stop()
    b.stop()
    for _ in range(3):
        t0 = time.monotonic()
        r = chat(p, "hi")
        assert time.monotonic() - t0 < 2.0  # the connect timeout
        assert r.status_code == 502
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "no upstream replica" in err["message"]
    ready = httpx.get(p.root + "/ready", timeout=10)
    assert ready.status_code == 503 and {s["state"] for s in ready.json()["replicas"]} == {"down"}


def test_a_duplicate_or_unreachable_url_at_start(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://user:secret@127.0.0.1:{free_port()}/v1"
    with caplog.at_level(logging.WARNING):
        p = pool_proxy(make_proxy, [fake_upstream.url, fake_upstream.url + "/", dead])
        assert asyncio.run(burst(p, 10)) == []
    assert "listed more than once" in caplog.text and "does not answer at start" in caplog.text
    assert "secret" not in caplog.text
    body = httpx.get(p.root + "/ready", timeout=10).json()
    assert [s["url"] for s in body["replicas"]] == [public_url(fake_upstream.url), public_url(dead)]
    assert "secret" not in str(body) and body["status"] == "ready"
    # one URL given twice is just one upstream: the plain client
    single = pool_proxy(make_proxy, [fake_upstream.url, fake_upstream.url])
    assert not isinstance(single.app.services.upstream, UpstreamPool)


async def test_backoff_doubles_up_to_the_cap() -> None:
    pool = UpstreamPool(["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"],
                        UpstreamSettings(backoff_s=0.5, backoff_max_s=3))
    r = pool.replicas[0]
    delays = []
    for _ in range(5):
        pool._failed(r, "refused")
        delays.append(round(r.retry_at - time.monotonic(), 1))
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    await pool.aclose()


def test_a_replica_that_comes_back_gets_the_adapters_first(pair: tuple[FakeUpstream, FakeUpstream],
                                                           make_proxy: Callable[..., ProxyServer]) -> None:
    a, b = pair
    port_b = int(b.url.rsplit(":", 1)[1].split("/")[0])
    p = pool_proxy(make_proxy, [a.url, b.url])
    pool = p.app.services.upstream
    assert isinstance(pool, UpstreamPool)
    p.run(pool.load_lora_adapter("fake-t-v1", "/adapters/fake-t-v1"))
    p.run(p.app.services.models.refresh())
    assert a.adapters == b.adapters == {"fake-t-v1": "/adapters/fake-t-v1"}

    b.stop()
    asyncio.run(burst(p, 10))  # b is found dead
    b2 = FakeUpstream(port=port_b).start()  # "restarted": it holds no adapter
    try:
        assert b2.adapters == {}
        deadline = time.monotonic() + 30  # generous: the machine may be busy
        while True:  # adapter traffic meanwhile: never to the replica without it
            r = chat(p, "hi", model="fake-t-v1")
            assert r.status_code == 200, r.text
            assert all(c.model != "fake-t-v1" or "fake-t-v1" in b2.adapters for c in b2.completion_calls())
            if "fake-t-v1" in b2.adapters:
                break
            assert time.monotonic() < deadline, "the replica never got its adapter back"
            time.sleep(0.02)
        loads = [r for r in b2.requests if r.path.endswith("load_lora_adapter")]
        assert len(loads) == 1
        a.clear()
        b2.clear()
        for i in range(30):
            assert httpx.post(p.url + "/chat/completions", timeout=30, json={
                "model": "fake-t-v1", "messages": [{"role": "user", "content": f"x{i}"}]}).status_code == 200
        assert min(calls(a), calls(b2)) > 0  # both serve it again

        p.run(pool.unload_lora_adapter("fake-t-v1"))
        assert a.adapters == b2.adapters == {}
        assert all(not s["adapters"] for s in httpx.get(p.root + "/ready", timeout=10).json()["replicas"])
    finally:
        b2.stop()


@pytest.mark.parametrize("noticed_by", ["health check", "a request's 404"])
def test_a_replica_restarted_between_checks_loses_no_adapter_traffic(
        pair: tuple[FakeUpstream, FakeUpstream], make_proxy: Callable[..., ProxyServer], noticed_by: str) -> None:
    a, b = pair
    interval = 0.1 if noticed_by == "health check" else 600.0
    p = make_proxy(None, upstream={"urls": [a.url, b.url], **FAST, "health_interval_s": interval})
    pool = p.app.services.upstream
    assert isinstance(pool, UpstreamPool)
    p.run(pool.load_lora_adapter("fake-t-v1", "/p"))
    p.run(p.app.services.models.refresh())
    b.adapters.clear()  # as if b restarted faster than a health check
    if noticed_by == "a request's 404":
        for i in range(20):  # the replica that lost it answers 404: reloaded there, answered by the other
            r = httpx.post(p.url + "/chat/completions", timeout=10, json={
                "model": "fake-t-v1", "messages": [{"role": "user", "content": f"x{i}"}]})
            assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30  # generous: the machine may be busy
    while "fake-t-v1" not in b.adapters:  # loaded there again
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_an_adaptation_cycle_promotes_on_every_replica_and_rolls_back_everywhere(
        pair: tuple[FakeUpstream, FakeUpstream], make_proxy: Callable[..., ProxyServer], tmp_path: Path) -> None:
    a, b = pair
    for f in pair:
        f.script(GateScript(**{"fake-tenant-a-v1": 4}))
    p = pool_proxy(make_proxy, [a.url, b.url], admin_key="adm", api_keys={"ka": "tenant-a"},
                   adapt={"enabled": True, "tenants": ["*"], "base_model_path": str(tmp_path), "gate_margin": 0.1},
                   memory={"embedder": "hashing", "distill": False})
    assert p.app.services.adapt is not None
    p.app.services.adapt.trainer = FakeTrainer()
    admin = {"authorization": "Bearer adm"}
    job = httpx.post(p.root + "/admin/adaptation/run", json=body(), headers=admin, timeout=10).json()
    assert wait_job(p, job["id"])["status"] == "succeeded"
    assert "fake-tenant-a-v1" in a.adapters and "fake-tenant-a-v1" in b.adapters  # loaded on both for the gate
    a.clear()
    b.clear()
    for i in range(20):
        r = httpx.post(p.url + "/chat/completions", headers={"authorization": "Bearer ka"}, timeout=10,
                       json={"model": "fake", "messages": [{"role": "user", "content": f"q{i}"}]})
        assert r.status_code == 200 and r.json()["model"] == "fake-tenant-a-v1"
    assert min(calls(a), calls(b)) > 0 and {c.model for c in a.completion_calls() + b.completion_calls()} == {
        "fake-tenant-a-v1"}
    r = httpx.post(p.root + "/admin/adapters/rollback", json={"tenant": "tenant-a"}, headers=admin, timeout=10)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30  # generous: the machine may be busy
    while a.adapters or b.adapters:  # unloaded everywhere once idle
        assert time.monotonic() < deadline, (a.adapters, b.adapters)
        time.sleep(0.05)
