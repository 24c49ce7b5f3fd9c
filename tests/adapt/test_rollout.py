"""``adapt.rollout.Rollout`` on its own: an in-memory adapter host and a real registry. The
service's tests (test_service.py) drive the same paths through whole cycles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapt.registry import AdapterRegistry, AdapterVersion
from adapt.rollout import Rollout
from adapt.watch import LiveWatch
from protocol.errors import NotFound, UpstreamStatusError
from protocol.upstream import Reply

BASE = "base-model"
pytestmark = pytest.mark.timeout(30)


class Host:
    """Loads and unloads by name, as vLLM does; a second load of a name answers 400 'already'."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    async def request(self, method: str, path: str, body: bytes | None = None, *, root: bool = False) -> Reply:
        raise AssertionError("Rollout sends no other request")

    async def load_lora_adapter(self, name: str, path: str) -> None:
        self.calls.append(("load", name))
        if name in self.loaded:
            raise UpstreamStatusError(400, f"The lora adapter '{name}' has already been loaded.", err_type=None,
                                      param=None, code=None)
        self.loaded.add(name)

    async def unload_lora_adapter(self, name: str) -> None:
        self.calls.append(("unload", name))
        if name not in self.loaded:
            raise UpstreamStatusError(404, f"The lora adapter '{name}' cannot be found.", err_type=None,
                                      param=None, code=None)
        self.loaded.discard(name)


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Rollout, Host, AdapterRegistry]:
    host, reg = Host(), AdapterRegistry(tmp_path / "adapters.sqlite3")
    return Rollout(host, reg, LiveWatch(4, 0.2)), host, reg


def version(reg: AdapterRegistry, tmp_path: Path, parent: str | None = None) -> AdapterVersion:
    return reg.new_version("a", BASE, tmp_path, parent=parent, data_hash="h", hyper={})


async def test_load_tolerates_a_version_loaded_already_and_tells_the_model_list(
        parts: tuple[Rollout, Host, AdapterRegistry], tmp_path: Path) -> None:
    rollout, host, reg = parts
    told: list[int] = []

    async def changed() -> None:
        told.append(1)

    rollout.models_changed = changed
    v = version(reg, tmp_path)
    await rollout.load(v)
    await rollout.load(v)  # a restart finding it loaded: not an error
    assert host.loaded == {v.name} and len(told) == 2


async def test_another_upstream_error_on_load_is_raised(parts: tuple[Rollout, Host, AdapterRegistry],
                                                        tmp_path: Path) -> None:
    rollout, host, reg = parts

    async def refuse(name: str, path: str) -> None:
        raise UpstreamStatusError(400, "LoRA rank 64 is greater than max_lora_rank 16.", err_type=None,
                                  param=None, code=None)

    host.load_lora_adapter = refuse  # type: ignore[method-assign]
    with pytest.raises(UpstreamStatusError, match="max_lora_rank"):
        await rollout.load(version(reg, tmp_path))


async def test_promote_switches_the_route_and_returns_the_version_it_retired(
        parts: tuple[Rollout, Host, AdapterRegistry], tmp_path: Path) -> None:
    rollout, _, reg = parts
    v1 = version(reg, tmp_path)
    assert rollout.promote(v1) is None and reg.active("a", BASE) == v1.name
    v2 = version(reg, tmp_path, parent=v1.name)
    assert rollout.promote(v2) == v1.name
    assert reg.active("a", BASE) == v2.name
    assert (reg.get(v1.name) or v1).status == "retired" and (reg.get(v2.name) or v2).status == "active"
    assert rollout.promote(v2) is None  # promoted again: nothing replaced


async def test_unload_waits_for_the_last_request_on_the_version(parts: tuple[Rollout, Host, AdapterRegistry],
                                                               tmp_path: Path) -> None:
    rollout, host, reg = parts
    v = version(reg, tmp_path)
    await rollout.load(v)
    rollout.promote(v)
    held = reg.acquire("a", BASE)
    assert held == v.name
    rollout.spawn(rollout.unload_when_idle(v.name))
    await asyncio.sleep(0.05)
    assert v.name in host.loaded  # a request still runs on it
    reg.release(held)
    for _ in range(100):
        if v.name not in host.loaded:
            break
        await asyncio.sleep(0.01)
    assert ("unload", v.name) in host.calls and v.name not in host.loaded


async def test_rollback_returns_to_the_parent_or_the_base(parts: tuple[Rollout, Host, AdapterRegistry],
                                                         tmp_path: Path) -> None:
    rollout, host, reg = parts
    with pytest.raises(NotFound):
        await rollout.rollback("a", BASE, "by hand")
    v1 = version(reg, tmp_path)
    v2 = version(reg, tmp_path, parent=v1.name)
    for v in (v1, v2):
        await rollout.load(v)
        rollout.promote(v)
    host.loaded.discard(v1.name)  # retired and unloaded meanwhile: a roll back loads it again
    out = await rollout.rollback("a", BASE, "worse live confidence")
    assert out == {"rolled_back": v2.name, "now": v1.name, "reason": "worse live confidence"}
    assert reg.active("a", BASE) == v1.name and v1.name in host.loaded
    assert (reg.get(v2.name) or v2).status == "rolled_back"
    out = await rollout.rollback("a", BASE, "by hand")
    assert out["now"] == BASE and reg.active("a", BASE) is None
    await rollout.close()


async def test_close_cancels_the_background_unloads(parts: tuple[Rollout, Host, AdapterRegistry],
                                                    tmp_path: Path) -> None:
    rollout, host, reg = parts
    v = version(reg, tmp_path)
    await rollout.load(v)
    rollout.promote(v)
    held = reg.acquire("a", BASE)  # a request in flight on the version
    rollout.spawn(rollout.unload_when_idle(v.name))
    await asyncio.sleep(0.01)
    await rollout.close()
    reg.release(held)  # the version goes idle: an unload still waiting would run now
    await asyncio.sleep(0.05)
    assert v.name in host.loaded and ("unload", v.name) not in host.calls

