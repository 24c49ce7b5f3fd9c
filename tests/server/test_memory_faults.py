"""Storage faults and imports through the HTTP API (issue 11): a database that cannot be opened
makes every memory call a fast 503 (never a hang, never a 500), and an import is all or none,
with duplicates reported."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer
from tests.server.test_memory_api import ADMIN, KEYS, auth, chat, entries, import_lines, settle, start, wait

pytestmark = pytest.mark.timeout(90)
__all__ = ["start"]  # the fixture, shared with test_memory_api


def _broken_server(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer], d: Path) -> ProxyServer:
    (d / "memory").mkdir(parents=True)
    (d / "memory" / "experiences.sqlite3").write_bytes(b"this is not an SQLite database" * 64)
    p = make_proxy(fake_upstream.url, data_dir=str(d), api_keys=KEYS, admin_key="adm",
                   memory={"embedder": "hashing", "distill": False, "remember": True})
    wait(lambda: "error" in httpx.get(p.root + "/admin/memory/stats", headers=ADMIN).json())
    return p


def test_a_database_that_cannot_be_opened_is_a_fast_503(fake_upstream: FakeUpstream,
                                                       make_proxy: Callable[..., ProxyServer], tmp_path: Path) -> None:
    p = _broken_server(fake_upstream, make_proxy, tmp_path / "data")
    stats = httpx.get(p.root + "/admin/memory/stats", headers=ADMIN)
    assert stats.status_code == 200 and stats.json()["ready"] is False
    assert "could not be opened" in stats.json()["error"]
    answer = chat(p, "ka", "What is 2 + 2?")  # serving goes on without memory
    line = orjson.dumps({"tenant": "t", "task": "q", "answer": "a", "score": 0.5})
    calls = [("POST", "/v1/feedback", auth("ka"), orjson.dumps({"id": answer["id"], "score": 0.9})),
             ("POST", "/admin/memory/import", ADMIN, line),
             ("GET", "/admin/memory/export", ADMIN, None),
             ("GET", "/admin/memory", ADMIN, None),
             ("DELETE", "/admin/memory/some-id", ADMIN, None),
             ("DELETE", "/admin/memory?tenant=t", ADMIN, None)]
    for method, path, headers, body in calls:
        t0 = time.monotonic()
        r = httpx.request(method, p.root + path, headers=headers, content=body, timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 503, (path, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "memory_unavailable", err
        assert took < 2.0, (path, took)
    assert httpx.get(p.root + "/health").status_code == 200


def test_export_never_500s_when_the_database_fails_mid_way(start: Callable[..., ProxyServer],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    p = start()
    import_lines(p, [{"tenant": "t", "task": "q", "answer": "a", "score": 0.5}])
    store = p.app.services.memory.store  # type: ignore[union-attr]

    def broken(tenant: str | None) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(store, "iter_all", broken)
    r = httpx.get(p.root + "/admin/memory/export", headers=ADMIN)
    assert r.status_code == 503 and r.json()["error"]["code"] == "memory_unavailable", r.text


def test_import_is_all_or_none(start: Callable[..., ProxyServer], monkeypatch: pytest.MonkeyPatch) -> None:
    p = start()
    rows = [{"tenant": "t", "task": f"distinct task number {i} " + "y" * i, "answer": f"a{i}", "score": 0.5}
            for i in range(40)]
    store = p.app.services.memory.store  # type: ignore[union-attr]
    real = store.insert_one
    n = [0]

    def fail_on_the_30th(exp: object, vec: object) -> object:
        n[0] += 1
        if n[0] == 30:
            raise sqlite3.OperationalError("disk I/O error")
        return real(exp, vec)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "insert_one", fail_on_the_30th)
    r = httpx.post(p.root + "/admin/memory/import", headers=ADMIN, timeout=30,
                   content=b"".join(orjson.dumps(x) + b"\n" for x in rows))
    assert r.status_code == 503, r.text
    assert entries(p, "t") == []  # the 29 written before the fault were rolled back
    monkeypatch.setattr(store, "insert_one", real)
    assert import_lines(p, rows)["imported"] == 40
    assert len(entries(p, "t", limit=100)) == 40


def test_a_large_import_drops_nothing(start: Callable[..., ProxyServer]) -> None:
    p = start(queue_size=64)  # the old import went through the write queue and dropped what did not fit
    rows = [{"tenant": f"t{i % 3}", "task": f"zorblat {i} question {i * 7919 % 10007}", "answer": str(i),
             "score": 0.5} for i in range(15_000)]
    out = import_lines(p, rows)
    assert out["imported"] + out["duplicates"] == 15_000, out
    assert out["duplicates"] == 0
    stats = httpx.get(p.root + "/admin/memory/stats", headers=ADMIN).json()
    assert stats["entries"] == out["inserted"] + 0 and sum(stats["tenants"].values()) == stats["entries"]
    assert out["inserted"] + out["merged"] == 15_000


def test_import_reports_duplicates(start: Callable[..., ProxyServer]) -> None:
    p = start()
    row = {"tenant": "t", "task": "What is the zorblat code?", "answer": "ZB-1", "score": 0.5}
    other = {"tenant": "t", "task": "Name a prime above ten", "answer": "11", "score": 0.5}
    assert import_lines(p, [row])["inserted"] == 1
    out = import_lines(p, [other, row, other])  # line 2 is already stored, line 3 repeats line 1
    assert out == {"imported": 1, "inserted": 1, "merged": 0, "duplicates": 2, "duplicate_lines": [2, 3]}
    assert len(entries(p, "t")) == 2


def test_an_import_over_the_tenant_limit_is_refused_whole(start: Callable[..., ProxyServer]) -> None:
    p = start(max_entries_per_tenant=10)
    rows = [{"tenant": "t", "task": f"task {i} " + "z" * i, "answer": str(i), "score": 0.5} for i in range(12)]
    body = b"".join(orjson.dumps(x) + b"\n" for x in rows)
    r = httpx.post(p.root + "/admin/memory/import", headers=ADMIN, content=body)
    assert r.status_code == 400 and "over the limit of 10" in r.json()["error"]["message"], r.text
    assert entries(p, "t") == []
    settle(p)
