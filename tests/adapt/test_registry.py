"""Adapter versions and routing: immutable names, activate/deactivate, in-flight counts, idle
waits and the versions restored at start."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapt.registry import AdapterRegistry

BASE = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[AdapterRegistry]:
    r = AdapterRegistry(tmp_path / "sub" / "adapters.sqlite3")  # the folder is created
    yield r
    r.close()


def new(reg: AdapterRegistry, tenant: str = "a", base: str = BASE, parent: str | None = None,
        root: Path = Path("/adapters")):
    return reg.new_version(tenant, base, root, parent=parent, data_hash="h", hyper={"rank": 8})


def test_names_are_versioned_per_tenant_and_base(reg: AdapterRegistry) -> None:
    a1, a2, b1 = new(reg, "a"), new(reg, "a"), new(reg, "b")
    other = new(reg, "a", base="other")
    assert [a1.name, a2.name, b1.name] == [f"{BASE}-a-v1", f"{BASE}-a-v2", f"{BASE}-b-v1"]
    assert other.name == "other-a-v1"
    assert (a1.version, a2.version, b1.version) == (1, 2, 1)
    assert a1.path == f"/adapters/{a1.name}"
    assert a1.status == "training"
    assert reg.get(a1.name) is not None and reg.get(a1.name).hyper == {"rank": 8}  # type: ignore[union-attr]


def test_names_are_never_reused_after_failure_rejection_or_restart(tmp_path: Path) -> None:
    path = tmp_path / "adapters.sqlite3"
    reg = AdapterRegistry(path)
    v1 = new(reg)
    reg.update(v1.name, status="failed")
    v2 = new(reg)
    reg.update(v2.name, status="rejected")
    reg.close()
    reg = AdapterRegistry(path)
    try:
        v3 = new(reg)
        assert v3.name == f"{BASE}-a-v3"
        assert {v.name for v in reg.versions()} == {v1.name, v2.name, v3.name}
    finally:
        reg.close()


def test_tenants_that_slug_alike_still_get_distinct_names(reg: AdapterRegistry) -> None:
    a = new(reg, "team a")
    b = new(reg, "team-a")  # the same slug: the name must not collide (nor raise)
    assert a.name != b.name
    assert reg.get(a.name).tenant == "team a"  # type: ignore[union-attr]
    assert reg.get(b.name).tenant == "team-a"  # type: ignore[union-attr]
    names = [v.name for v in reg.versions()]
    assert len(names) == len(set(names)) == 2


def test_slug_keeps_names_safe(reg: AdapterRegistry) -> None:
    v = new(reg, "ACME / team #1", base="org/model:latest")
    assert v.name == "org-model-latest-ACME-team-1-v1"
    assert "/" not in v.name and " " not in v.name


def test_versions_filter_by_tenant_in_creation_order(reg: AdapterRegistry) -> None:
    a1, _, a2 = new(reg, "a"), new(reg, "b"), new(reg, "a")
    assert [v.name for v in reg.versions("a")] == [a1.name, a2.name]
    assert len(reg.versions()) == 3
    assert reg.get("nope") is None


def test_update_persists_scores_lineage_and_status(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    reg = AdapterRegistry(path)
    v1 = new(reg)
    v2 = new(reg, parent=v1.name)
    reg.update(v2.name, score_new=0.75, score_old=0.25, status="active", promoted_at=123.0, note="ok")
    reg.close()
    reg = AdapterRegistry(path)
    try:
        got = reg.get(v2.name)
        assert got is not None
        assert (got.parent, got.score_new, got.score_old, got.status, got.promoted_at, got.note) == (
            v1.name, 0.75, 0.25, "active", 123.0, "ok")
        assert got.data_hash == "h" and got.hyper == {"rank": 8}
    finally:
        reg.close()


def test_activate_switches_and_returns_the_replaced_name(reg: AdapterRegistry) -> None:
    v1, v2 = new(reg), new(reg)
    assert reg.active("a", BASE) is None
    assert reg.activate(v1) is None
    assert reg.active("a", BASE) == v1.name
    assert reg.activate(v2) == v1.name
    assert reg.active("a", BASE) == v2.name
    assert reg.active("a", "other-base") is None
    assert reg.deactivate("a", BASE) == v2.name
    assert reg.active("a", BASE) is None
    assert reg.deactivate("a", BASE) is None


def test_routes_are_per_tenant_unless_shared(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "r.sqlite3")
    v = new(reg, "a")
    reg.activate(v)
    assert reg.acquire("a", BASE) == v.name
    assert reg.acquire("b", BASE) == BASE  # another tenant still gets the base model
    reg.close()

    shared = AdapterRegistry(tmp_path / "s.sqlite3", shared=True)
    v = new(shared, "a")
    shared.activate(v)
    assert shared.acquire("a", BASE) == v.name
    assert shared.acquire("b", BASE) == v.name
    assert shared.deactivate("b", BASE) == v.name  # one route for everyone
    assert shared.acquire("a", BASE) == BASE
    shared.close()


def test_acquire_and_release_count_in_flight(reg: AdapterRegistry) -> None:
    assert reg.acquire("a", BASE) == BASE
    assert reg.in_flight(BASE) == 1
    v = new(reg)
    reg.activate(v)
    assert [reg.acquire("a", BASE) for _ in range(3)] == [v.name] * 3
    assert reg.in_flight(v.name) == 3 and reg.in_flight(BASE) == 1
    reg.release(v.name)
    assert reg.in_flight(v.name) == 2
    reg.release(v.name)
    reg.release(v.name)
    reg.release(BASE)
    assert reg.in_flight(v.name) == 0 and reg.in_flight(BASE) == 0
    reg.release(v.name)  # an extra release does not go negative
    assert reg.in_flight(v.name) == 0
    assert reg.acquire("a", BASE) == v.name and reg.in_flight(v.name) == 1


async def test_idle_returns_at_once_without_requests(reg: AdapterRegistry) -> None:
    async with asyncio.timeout(1):
        await reg.idle("anything")


async def test_idle_waits_until_the_last_request_finishes(reg: AdapterRegistry) -> None:
    v = new(reg)
    reg.activate(v)
    names = [reg.acquire("a", BASE) for _ in range(2)]
    waiter = asyncio.create_task(reg.idle(v.name))
    second = asyncio.create_task(reg.idle(v.name))  # two waiters on the same name
    await asyncio.sleep(0.05)
    assert not waiter.done()
    reg.release(names[0])
    await asyncio.sleep(0.05)
    assert not waiter.done()  # one still in flight
    reg.release(names[1])
    async with asyncio.timeout(1):
        await asyncio.gather(waiter, second)
    # a later request and idle wait work again (a fresh event, not the spent one)
    reg.acquire("a", BASE)
    again = asyncio.create_task(reg.idle(v.name))
    await asyncio.sleep(0.05)
    assert not again.done()
    reg.release(v.name)
    async with asyncio.timeout(1):
        await again


async def test_switch_keeps_old_requests_counted_on_the_old_name(reg: AdapterRegistry) -> None:
    v1, v2 = new(reg), new(reg)
    reg.activate(v1)
    old = reg.acquire("a", BASE)
    reg.activate(v2)
    assert reg.acquire("a", BASE) == v2.name  # new requests go to v2 at once
    idle = asyncio.create_task(reg.idle(v1.name))
    await asyncio.sleep(0.05)
    assert not idle.done()
    reg.release(old)
    async with asyncio.timeout(1):
        await idle
    assert reg.in_flight(v2.name) == 1


def test_restore_lists_the_active_versions(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    reg = AdapterRegistry(path)
    a1, a2, b1, c1 = new(reg, "a"), new(reg, "a"), new(reg, "b"), new(reg, "c")
    reg.update(a1.name, status="retired")
    reg.update(a2.name, status="active")
    reg.update(b1.name, status="active")
    reg.update(c1.name, status="rolled_back")
    reg.close()
    reg = AdapterRegistry(path)
    try:
        assert reg.active("a", BASE) is None  # routes live in memory: nothing until restored
        restored = reg.restore()
        assert sorted(v.name for v in restored) == sorted([a2.name, b1.name])
        for v in restored:
            reg.activate(v)
        assert reg.active("a", BASE) == a2.name and reg.active("b", BASE) == b1.name
        assert reg.active("c", BASE) is None
    finally:
        reg.close()
