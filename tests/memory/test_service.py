"""The memory service with the hashing embedder: remember/recall, dedup, limits, back-pressure,
repair at start-up, crash safety (kill -9 of a writer) and tenant isolation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from memory.service import MemoryConfig, MemoryService
from memory.store import Experience

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]

class Memories:
    """Starts MemoryServices (hashing embedder) on ``tmp_path/mem`` unless told otherwise; every
    one started and not stopped by the test is stopped after it."""

    def __init__(self, tmp_path: Path) -> None:
        self.default_dir = tmp_path / "mem"
        self.running: list[MemoryService] = []

    async def start(self, directory: Path | None = None, **config: Any) -> MemoryService:
        config.setdefault("embedder", "hashing")
        config.setdefault("persist_interval_s", 0.1)
        m = MemoryService(MemoryConfig(directory=directory or self.default_dir, **config))
        await m.start()
        await m.wait_ready(30)
        self.running.append(m)
        return m

    async def stop(self, m: MemoryService) -> None:
        self.running.remove(m)
        await m.stop()


@pytest.fixture
async def mems(tmp_path: Path) -> AsyncIterator[Memories]:
    ms = Memories(tmp_path)
    yield ms
    for m in list(ms.running):
        await ms.stop(m)


def exp(task: str, answer: str = "an answer", score: float = 0.9, tenant: str = "a", **kw: Any) -> Experience:
    return Experience(tenant=tenant, task=task, answer=answer, score=score, **kw)


async def remember_all(m: MemoryService, items: list[Experience]) -> list[Experience | None]:
    return list(await asyncio.gather(*(m.remember(e) for e in items)))


TASKS = ["What is the capital of France?", "Sort a list of integers in Python", "How many legs does a spider have?",
         "Translate good morning into German", "Write a haiku about the sea"]


async def test_remember_then_recall(mems: Memories) -> None:
    m = await mems.start()
    rows = await remember_all(m, [exp(t, answer=f"answer {i}") for i, t in enumerate(TASKS)])
    assert all(r is not None and r.id is not None for r in rows)
    hits = await m.recall("a", "what is the capital of france")
    assert hits and hits[0].experience.task == TASKS[0] and hits[0].experience.answer == "answer 0"
    assert hits[0].similarity > 0.9
    assert all(h.similarity >= 0.35 for h in hits)
    assert len(await m.recall("a", "capital France legs spider sea haiku", k=2, threshold=0.0)) == 2
    assert await m.recall("a", "   ") == []
    assert await m.recall("a", "quantum chromodynamics lattice", threshold=0.5) == []
    # Recall counts as use.
    await m.flush()
    await asyncio.sleep(0.1)
    row = await m.run(m.store.by_uid, hits[0].experience.uid)  # type: ignore[union-attr]
    assert row.uses >= 1
    stats = await m.run(m.stats)
    assert stats["ready"] and stats["entries"] == 5 and stats["tenants"] == {"a": 5} and stats["embedder"] == "hashing"
    assert stats["index"]["a"] == {"size": 5, "hnsw": False}


async def test_recall_before_ready_is_empty(tmp_path: Path) -> None:
    m = MemoryService(MemoryConfig(directory=tmp_path, embedder="hashing"))
    assert await m.recall("a", "anything") == [] and not m.ready
    assert m.stats() == {"ready": False}


async def test_near_duplicate_keeps_the_better_answer(mems: Memories) -> None:
    m = await mems.start()
    first = await m.remember(exp("What is 17 * 3?", answer="41", score=0.4))
    # Same words (punctuation and case aside): one entry, the better-scored answer wins.
    better = await m.remember(exp("what is 17 * 3", answer="51", score=0.95))
    assert better is not None and first is not None and better.uid == first.uid
    assert better.answer == "51"
    worse = await m.remember(exp("What is 17*3?", answer="50", score=0.1))
    assert worse is not None and worse.answer == "51"
    assert m.store.count("a") == 1  # type: ignore[union-attr]
    hits = await m.recall("a", "What is 17 * 3?")
    assert [(h.experience.answer, round(h.experience.score, 2)) for h in hits] == [("51", 0.95)]
    # Another tenant's identical task is not a duplicate of this one.
    other = await m.remember(exp("What is 17 * 3?", answer="51", tenant="b"))
    assert other is not None and other.uid != first.uid and m.store.count() == 2  # type: ignore[union-attr]


async def test_per_tenant_limit_evicts_lowest_score(mems: Memories) -> None:
    m = await mems.start(max_entries_per_tenant=3, batch_size=1)
    for i, score in enumerate([0.9, 0.2, 0.8, 0.7, 0.3]):
        await m.remember(exp(TASKS[i], answer=f"answer {i}", score=score))
    await m.remember(exp("something for b", tenant="b", score=0.0))
    kept = sorted(e.task for e in m.store.iter_all("a"))  # type: ignore[union-attr]
    assert kept == sorted([TASKS[0], TASKS[2], TASKS[3]])
    assert m.store.count("b") == 1  # type: ignore[union-attr]
    assert m.indexes.tenants["a"].size == 3  # type: ignore[union-attr]
    assert await m.recall("a", TASKS[1], threshold=0.9) == []  # evicted from the index too


async def test_text_is_truncated(mems: Memories) -> None:
    m = await mems.start(max_text_chars=50)
    row = await m.remember(exp("q " * 100, answer="a" * 500))
    assert row is not None and len(row.task) == 50 and len(row.answer) == 50
    stored = next(m.store.iter_all("a"))  # type: ignore[union-attr]
    assert len(stored.task) == 50 and len(stored.answer) == 50
    assert await m.recall("a", "q " * 5000)  # a long query is truncated too, and still recalls


async def test_full_queue_drops_and_counts(mems: Memories) -> None:
    m = await mems.start(queue_size=2)
    futs = [m.remember(exp(f"task {i} " + TASKS[i % 5], answer=str(i))) for i in range(6)]  # no yield between
    dropped = [f for f in futs if f.done()]
    assert len(dropped) == 4 and all(f.result() is None for f in dropped)
    assert m.dropped == 4
    kept = await asyncio.gather(*futs[:2])
    assert all(r is not None for r in kept)
    assert (await m.run(m.stats))["dropped"] == 4


async def test_delete_ids_and_tenant(mems: Memories) -> None:
    m = await mems.start()
    rows = await remember_all(m, [exp(t) for t in TASKS] + [exp(TASKS[0], tenant="b")])
    assert await m.run(m.delete_ids, [rows[0].uid, "missing"]) == 1  # type: ignore[union-attr]
    assert await m.recall("a", TASKS[0], threshold=0.9) == []
    assert await m.recall("b", TASKS[0], threshold=0.9)
    assert await m.run(m.delete_tenant, "a") == 4
    assert await m.recall("a", TASKS[1]) == []
    assert (await m.run(m.stats))["tenants"] == {"b": 1}


async def test_distiller_adds_insights(mems: Memories) -> None:
    seen: list[str] = []

    async def distil(exp: Experience) -> tuple[str, str]:  # the Distiller protocol's signature
        seen.append(exp.task)
        if "fail" in exp.task:
            raise RuntimeError("upstream down")
        return f"insight on {exp.task}", "1. {x}"

    m = await mems.start()
    m.distiller = distil
    rows = await remember_all(m, [exp("task one"), exp("this will fail")])
    await m.flush()
    assert sorted(seen) == ["task one", "this will fail"]
    got = await m.run(m.store.get, [r.id for r in rows])  # type: ignore[union-attr]
    assert got[rows[0].id].insights == "insight on task one" and got[rows[0].id].workflow == "1. {x}"  # type: ignore[union-attr]
    assert got[rows[1].id].insights == ""  # type: ignore[union-attr]


async def test_index_goes_hnsw_past_the_threshold(mems: Memories, tmp_path: Path) -> None:
    m = await mems.start(hnsw_threshold=40, batch_size=16)
    tasks = [f"question {i} about item {i * 31 % 97} in set {i * 7 % 13}" for i in range(60)]
    await remember_all(m, [exp(t, answer=str(i)) for i, t in enumerate(tasks)])
    idx = m.indexes.tenants["a"]  # type: ignore[union-attr]
    assert idx.hnsw and idx.size == 60
    hits = await m.recall("a", tasks[17])
    assert hits[0].experience.answer == "17"
    await mems.stop(m)
    again = await mems.start()
    assert again.repaired == [] and again.indexes.tenants["a"].hnsw  # type: ignore[union-attr]


async def test_clean_restart_needs_no_repair(mems: Memories, tmp_path: Path) -> None:
    m = await mems.start()
    rows = await remember_all(m, [exp(t) for t in TASKS])
    await m.run(m.delete_ids, [rows[-1].uid])  # type: ignore[union-attr]  # the newest row
    await mems.stop(m)
    again = await mems.start()
    assert again.repaired == []
    assert again.indexes.tenants["a"].size == 4  # type: ignore[union-attr]
    assert (await again.recall("a", TASKS[0]))[0].experience.uid == rows[0].uid  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["delete index files", "corrupt manifest", "manifest says otherwise",
                                    "corrupt index file", "stale index"])
async def test_restart_repairs_the_index_from_sqlite(mems: Memories, tmp_path: Path, damage: str) -> None:
    d = tmp_path / "mem"
    m = await mems.start(d)
    await remember_all(m, [exp(t, tenant=tn) for t in TASKS for tn in ("a", "b")])
    await mems.stop(m)
    index_dir = d / "index"
    manifest = json.loads((index_dir / "manifest.json").read_text())
    if damage == "delete index files":
        for f in index_dir.iterdir():
            f.unlink()
    elif damage == "corrupt manifest":
        (index_dir / "manifest.json").write_text('{"a": {"file": 12')
    elif damage == "manifest says otherwise":
        manifest["a"]["max_id"] = 1  # older than SQLite's newest row
        manifest["b"] = "garbage"
        manifest["gone"] = {"file": "x.faiss", "count": 1, "max_id": 1}  # a tenant SQLite no longer has
        (index_dir / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "corrupt index file":
        (index_dir / manifest["a"]["file"]).write_bytes(b"\x00" * 64)
    else:  # rows committed after the last persist (a crash): the old index lags behind
        old = {p.name: p.read_bytes() for p in index_dir.iterdir()}
        m2 = await mems.start(d)
        await remember_all(m2, [exp("one more task for a"), exp("and another for a")])
        await mems.stop(m2)
        for name, data in old.items():
            (index_dir / name).write_bytes(data)
    again = await mems.start(d)
    expect = {"a": 7, "b": 5} if damage == "stale index" else {"a": 5, "b": 5}
    assert set(again.repaired) >= ({"a"} if damage != "delete index files" else {"a", "b"})
    for tenant, n in expect.items():
        assert again.indexes.tenants[tenant].size == n == again.store.count(tenant)  # type: ignore[union-attr]
    assert "gone" not in again.indexes.tenants  # type: ignore[union-attr]
    assert (await again.recall("a", TASKS[3]))[0].experience.task == TASKS[3]
    if damage == "stale index":
        assert (await again.recall("a", "one more task for a"))[0].experience.task == "one more task for a"
    # The repaired index was persisted: the next start needs no repair.
    await mems.stop(again)
    third = await mems.start(d)
    assert third.repaired == []


async def test_tenant_isolation(mems: Memories) -> None:
    m = await mems.start()
    secret = "What is the launch code for project nightingale?"
    await m.remember(exp(secret, answer="hunter2", tenant="a"))
    await m.remember(exp("unrelated task of b", tenant="b"))
    assert (await m.recall("a", secret))[0].experience.answer == "hunter2"
    # Not even at any similarity: b only ever sees its own.
    assert [h.experience.tenant for h in await m.recall("b", secret, k=32, threshold=-1.0)] == ["b"]
    assert await m.recall("c", secret, threshold=-1.0) == []  # a tenant with no memory at all


# ------------------------------------------------------------------------------------ crash safety

_WRITER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from memory.service import MemoryConfig, MemoryService
    from memory.store import Experience

    async def main():
        m = MemoryService(MemoryConfig(directory=Path(sys.argv[1]), embedder="hashing", batch_size=8,
                                       persist_interval_s=0.02, max_entries_per_tenant=100_000))
        await m.start()
        await m.wait_ready(60)
        i = 0
        while True:
            futs = [m.remember(Experience(tenant="t%d" % ((i + j) % 3), answer="answer %d" % (i + j), score=0.9,
                                          task="task %d on topic %d of area %d" % (i + j, (i + j) * 7919 % 1009,
                                                                                   (i + j) % 17)))
                    for j in range(8)]
            for f in futs:
                row = await f
                if row is not None:
                    sys.stdout.write("%s %s %s\\n" % (row.uid, row.tenant, row.answer))
                    sys.stdout.flush()
            i += 8

    asyncio.run(main())
""")


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    d = tmp_path / "mem"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    acked: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        while len(acked) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(tuple(line.split(maxsplit=2)))  # type: ignore[arg-type]
        assert len(acked) >= 300, proc.stderr.read() if proc.poll() is not None and proc.stderr else "too slow"
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: batches in flight, a persist perhaps half-way
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    acked += [tuple(x.split(maxsplit=2)) for x in rest.splitlines() if x.strip()]  # type: ignore[misc]

    async def check() -> None:
        m = MemoryService(MemoryConfig(directory=d, embedder="hashing"))
        await m.start()
        await m.wait_ready(60)
        try:
            assert m.store is not None and m.indexes is not None
            print(f"{len(acked)} acknowledged before kill -9; {m.store.count()} rows; rebuilt: {m.repaired}")
            for uid, tenant, answer in acked:
                row = m.store.by_uid(uid)
                assert row is not None, f"acknowledged {uid} lost"
                assert (row.tenant, row.answer.strip()) == (tenant, answer.strip())
            truth = m.store.tenants()
            assert truth and sum(c for c, _ in truth.values()) >= len({a[0] for a in acked})
            for tenant, (count, max_id) in truth.items():
                idx = m.indexes.tenants[tenant]
                assert idx.size == count and idx.max_id == max_id
            # Spot-check that the index finds what SQLite holds.
            for uid, tenant, _ in acked[:: max(len(acked) // 20, 1)]:
                row = m.store.by_uid(uid)
                assert row is not None
                hits = await m.recall(tenant, row.task, k=1, threshold=0.9)
                assert hits and hits[0].experience.uid == uid
        finally:
            await m.stop()

    asyncio.run(check())


async def test_recall_is_not_blocked_by_a_slow_persist(mems: Memories, monkeypatch: pytest.MonkeyPatch) -> None:
    import memory.index

    m = await mems.start(persist_interval_s=3600)
    await m.remember(exp(TASKS[0]))
    real_write = memory.index.atomic_write
    writing = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_write(path: Path, data: bytes) -> None:
        loop.call_soon_threadsafe(writing.set)
        time.sleep(2.0)  # a large index on a slow disk
        real_write(path, data)

    monkeypatch.setattr(memory.index, "atomic_write", slow_write)
    m.indexes.dirty.add("a")  # type: ignore[union-attr]
    persisting = loop.run_in_executor(m._write_pool, m._persist)
    await asyncio.wait_for(writing.wait(), 10)
    t = time.perf_counter()
    hits = await m.recall("a", TASKS[0])
    assert hits and time.perf_counter() - t < 1.5
    assert not persisting.done()
    await persisting
