"""Two real vLLM replicas (SmolLM2-135M on CPU) behind one sharpen on loopback: requests spread
over both; a LoRA adapter is loaded on both and served by both; one replica is killed mid-load
with no failed request (none had started streaming: non-streamed answers reach the client whole);
the supervisor restarts it, and sharpen takes it back only after loading the adapter on it again
(adapter requests meanwhile all succeed: none reaches the replica without it).

Replica A is the session's shared vLLM; replica B is this module's, on a fixed port so that the
restarted process answers at the same URL.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.pool import UpstreamPool
from server.redact import redact_url as public_url
from server.replica import prefix_key
from tests.proxy_server import ProxyServer, free_port
from tests.real_backend import RealVLLM, real_backend_settings

pytestmark = [
    pytest.mark.real,
    pytest.mark.timeout(900),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("peft") is None,
                       reason="needs vLLM and peft"),
]

ADAPTER = "smollm2-replicas-test-v1"
_MAKE_ADAPTER = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                 init_lora_weights=False)
get_peft_model(m, cfg).save_pretrained(sys.argv[2])
"""


@pytest.fixture(scope="module")
def replica_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVLLM]:
    settings = real_backend_settings(port=free_port(), restart_backoff=1.0)
    with RealVLLM(tmp_path_factory.mktemp("replica-b"), settings=settings) as b:
        yield b


@pytest.fixture(scope="module")
def adapter(real_vllm: RealVLLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (randomly initialised) rank-8 LoRA: what is tested is where it is loaded."""
    out = tmp_path_factory.mktemp("adapter") / ADAPTER
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _MAKE_ADAPTER, str(real_vllm.model_path), str(out)], check=True,
                   env=env, timeout=300)
    return out


@pytest.fixture(scope="module")
def proxy(real_vllm: RealVLLM, replica_b: RealVLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    urls = [real_vllm.base_url, replica_b.base_url]
    with ProxyServer(None, upstream={"urls": urls, "health_interval_s": 0.5, "backoff_s": 0.5, "backoff_max_s": 4},
                     data_dir=str(tmp_path_factory.mktemp("replicas-data")),
                     memory={"embedder": "hashing", "distill": False}) as p:
        yield p
        pool = pool_of(p)
        if ADAPTER in pool._wanted:  # leave the shared vLLM as we found it
            p.run(pool.unload_lora_adapter(ADAPTER))


def pool_of(p: ProxyServer) -> UpstreamPool:
    pool = p.app.services.upstream
    assert isinstance(pool, UpstreamPool)
    return pool


def ok_calls(p: ProxyServer) -> dict[str, float]:
    text = httpx.get(p.root + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in
            re.finditer(r'sharpen_replica_calls_total\{outcome="ok",replica="([^"]+)"\} (\S+)', text)}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def question(i: int) -> str:
    return f"Count from {i} to {i + 5}."


async def _load(p: ProxyServer, n: int, model: str, *, concurrency: int = 6, stream: bool = False,
                max_tokens: int = 16, starts: list[int] | None = None) -> list[str]:
    sem = asyncio.Semaphore(concurrency)
    fails: list[str] = []
    async with httpx.AsyncClient(timeout=300) as c:
        async def one(i: int) -> None:
            async with sem:
                try:
                    r = await c.post(p.url + "/chat/completions", json={
                        "model": model, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": question(i)}]})
                    good = r.status_code == 200 and ("data: [DONE]" in r.text if stream else "choices" in r.json())
                    if not good:
                        fails.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    fails.append(repr(exc))
        await asyncio.gather(*(one(i) for i in (starts if starts is not None else range(n))))
    return fails


def load(p: ProxyServer, n: int, model: str, **kw: Any) -> list[str]:
    return asyncio.run(_load(p, n, model, **kw))


def vllm_models(v: RealVLLM) -> set[str]:
    r = httpx.get(v.base_url + "/models", timeout=30, trust_env=False)
    return {c["id"] for c in r.json()["data"]}


def test_requests_spread_over_two_real_replicas(proxy: ProxyServer, real_vllm: RealVLLM,
                                                replica_b: RealVLLM) -> None:
    # Each request's replica is first chosen by rendezvous hashing of its prompt (prefix
    # affinity), so 24 arbitrary prompts may fall 19:5 by chance. Pick 12 prompts that hash to
    # each replica: what is tested is that the pool balances them, not how the hash falls.
    pool = pool_of(proxy)
    home: dict[str, list[int]] = {r.label: [] for r in pool.replicas}
    for i in range(1000):
        key = prefix_key({"messages": [{"role": "user", "content": question(i)}]})
        winner = max(pool.replicas, key=lambda r: r.score(key))
        if len(home[winner.label]) < 12:
            home[winner.label].append(i)
    starts = [i for pair in zip(*home.values(), strict=True) for i in pair]  # alternating
    assert len(starts) == 24
    # At most ``affinity_slack`` requests in flight: a prompt then always goes to its own replica,
    # whatever each replica's speed. With more (the full suite ran 6 at once) a replica slowed by
    # the other's load holds more in flight and the pool rightly sends its prompts elsewhere
    # (19:5 seen twice, even after warming both): load balancing, which the fake-upstream pool
    # tests cover, not the spread over two real servers this test is about.
    slack = pool.settings.affinity_slack
    before = ok_calls(proxy)
    assert load(proxy, 24, real_vllm.served_name, starts=starts, concurrency=slack) == []
    d = delta(before, ok_calls(proxy))
    state = {r.label: (r.up, r.in_flight, r.failures, r.error) for r in pool.replicas}
    print("spread:", d, "replicas (up, in flight, failures, error):", state)
    # 12:12 by affinity; a replica briefly marked down by a late health check may lose a couple
    a, b = d[public_url(real_vllm.base_url)], d[public_url(replica_b.base_url)]
    assert a + b == 24 and min(a, b) >= 10, (d, state)


def test_an_adapter_is_loaded_on_both_and_served_by_both(proxy: ProxyServer, real_vllm: RealVLLM,
                                                          replica_b: RealVLLM, adapter: Path) -> None:
    proxy.run(pool_of(proxy).load_lora_adapter(ADAPTER, str(adapter)))
    proxy.run(proxy.app.services.models.refresh())
    assert ADAPTER in vllm_models(real_vllm) and ADAPTER in vllm_models(replica_b)
    before = ok_calls(proxy)
    assert load(proxy, 16, ADAPTER) == []
    d = delta(before, ok_calls(proxy))
    print("adapter spread:", d)
    assert min(d.values()) >= 3


@pytest.mark.timeout(1500)  # a restart of B on 2 cores busy with A took 6+ minutes once (2026-12-03)
def test_failover_mid_load_and_the_restarted_replica_gets_the_adapter_back(
        proxy: ProxyServer, real_vllm: RealVLLM, replica_b: RealVLLM, adapter: Path) -> None:
    if ADAPTER not in pool_of(proxy)._wanted:
        test_an_adapter_is_loaded_on_both_and_served_by_both(proxy, real_vllm, replica_b, adapter)
    base = real_vllm.served_name
    result: dict[str, list[str]] = {}
    worker = threading.Thread(target=lambda: result.setdefault("fails", load(proxy, 48, base, concurrency=8,
                                                                             max_tokens=32)))
    worker.start()
    pid = replica_b.process.pid
    assert pid is not None
    deadline = time.monotonic() + 60
    while not any(r["in_flight"] for r in httpx.get(proxy.root + "/ready", timeout=10).json()["replicas"]
                  if r["url"] == public_url(replica_b.base_url)):
        assert time.monotonic() < deadline, "replica B never had a request in flight"
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)  # replica B dies with requests in flight
    t_kill = time.monotonic()
    worker.join(300)
    print(f"load with a replica killed mid-way: {len(result['fails'])} failed")
    assert result["fails"] == [], result["fails"][:3]

    ready = httpx.get(proxy.root + "/ready", timeout=10)
    assert ready.status_code == 200
    assert load(proxy, 6, base, stream=True) == []  # streams opened after the failure go to A

    # B's supervisor restarts it (no adapter in it); adapter traffic meanwhile never reaches it
    b_url = public_url(replica_b.base_url)
    sent = 0
    while True:
        assert load(proxy, 2, ADAPTER, concurrency=2, max_tokens=4) == []
        sent += 2
        state = next(r for r in httpx.get(proxy.root + "/ready", timeout=10).json()["replicas"] if r["url"] == b_url)
        if state["state"] == "up":
            break
        assert time.monotonic() - t_kill < 900, f"replica B not back: {state}"
        time.sleep(3.0)  # a trickle, not a flood: B's start-up shares these cores with A
    print(f"replica B back {time.monotonic() - t_kill:.0f} s after the kill; {sent} adapter requests meanwhile, "
          f"all answered; restarts: {replica_b.process.restarts}")
    assert replica_b.process.restarts == 1 and replica_b.process.pid != pid
    assert ADAPTER in state["adapters"] and ADAPTER in vllm_models(replica_b)  # loaded again by sharpen
    before = ok_calls(proxy)
    assert load(proxy, 16, ADAPTER) == []
    assert delta(before, ok_calls(proxy))[b_url] >= 3  # and B serves it again

    proxy.run(pool_of(proxy).unload_lora_adapter(ADAPTER))  # roll back: unloaded everywhere
    assert ADAPTER not in vllm_models(real_vllm) and ADAPTER not in vllm_models(replica_b)
