"""Storage faults seen (memory/integrity.py): rows lost from SQLite behind the persisted index's
back are reported at start (an error with the numbers, and in the stats), while deletions made
through the service are not; a database that cannot be opened fails memory calls at once."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from memory.integrity import MemoryUnavailable
from memory.service import MemoryConfig, MemoryService
from memory.store import Experience

pytestmark = pytest.mark.timeout(60)


async def _started(d: Path) -> MemoryService:
    m = MemoryService(MemoryConfig(directory=d, embedder="hashing", persist_interval_s=0.1))
    await m.start()
    await m.wait_ready(30)
    return m


async def _fill(m: MemoryService, n: int, tenant: str = "a") -> list[Experience | None]:
    return list(await asyncio.gather(*(m.remember(Experience(tenant=tenant, task=f"task {i} of {tenant} " + "x" * i,
                                                             answer=f"answer {i}", score=0.9)) for i in range(n))))


async def test_rows_lost_behind_the_index_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "mem"
    m = await _started(d)
    rows = await _fill(m, 150)
    await _fill(m, 10, tenant="b")
    assert all(rows)
    await m.stop()
    # What a damaged WAL does: committed rows gone, the persisted index still counting them.
    db = sqlite3.connect(d / "experiences.sqlite3")
    db.execute("DELETE FROM experiences WHERE tenant='a' AND id % 2 = 0")
    db.commit()
    db.close()
    with caplog.at_level(logging.ERROR, logger="memory.integrity"):
        again = await _started(d)
    try:
        assert again.lost == {"a": {"recorded": 150, "found": 75}}
        stats = await again.run(again.stats)
        assert stats["lost_at_start"] == {"a": {"recorded": 150, "found": 75}}
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("75 fewer entries" in e and "150 recorded, 75 found" in e for e in errors), errors
        assert again.indexes is not None and again.indexes.tenants["a"].size == 75  # and repaired
    finally:
        await again.stop()


async def test_deletions_through_the_service_are_no_loss(tmp_path: Path) -> None:
    d = tmp_path / "mem"
    m = await _started(d)
    rows = await _fill(m, 20)
    await _fill(m, 5, tenant="b")
    assert await m.run(m.delete_ids, [r.uid for r in rows[:7] if r is not None]) == 7
    assert await m.run(m.delete_tenant, "b") == 5
    await m.stop()
    again = await _started(d)
    try:
        assert again.lost == {}
        assert (await again.run(again.stats))["lost_at_start"] == {}
    finally:
        await again.stop()


async def test_a_database_that_cannot_be_opened_fails_fast(tmp_path: Path) -> None:
    d = tmp_path / "mem"
    m = await _started(d)
    await _fill(m, 5)
    await m.stop()
    db = d / "experiences.sqlite3"
    db.write_bytes(b"garbage header!!" * 8 + db.read_bytes()[128:])
    broken = MemoryService(MemoryConfig(directory=d, embedder="hashing"))
    await broken.start()
    t0 = time.monotonic()
    with pytest.raises(MemoryUnavailable, match="could not be opened"):
        await broken.wait_ready(30)
    with pytest.raises(MemoryUnavailable):
        await broken.run(lambda: None)
    with pytest.raises(MemoryUnavailable):
        await broken.remember(Experience(tenant="a", task="t", answer="a", score=0.9))
    assert time.monotonic() - t0 < 5
    assert broken.stats()["ready"] is False and "could not be opened" in broken.stats()["error"]
    assert await broken.recall("a", "task 1") == []
    await broken.stop()


async def test_writes_queued_before_the_failure_are_failed_not_left_hanging(tmp_path: Path) -> None:
    d = tmp_path / "mem"
    d.mkdir()
    (d / "experiences.sqlite3").write_bytes(b"not a database at all" * 100)
    broken = MemoryService(MemoryConfig(directory=d, embedder="hashing"))
    await broken.start()
    fut = broken.remember(Experience(tenant="a", task="t", answer="a", score=0.9))  # queued while opening
    with pytest.raises(MemoryUnavailable):
        await asyncio.wait_for(fut, 10)
    await broken.stop()
