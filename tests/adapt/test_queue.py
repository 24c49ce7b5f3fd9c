"""The durable queue of uncertain queries: per-tenant de-duplication by similarity, pending vs
used, ordering, durability across reopening, the live samples a query keeps, and a queue
written before they were kept."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from adapt.queue import UncertainQueue
from memory.embedder import HashingEmbedder
from protocol.events import Sample


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[UncertainQueue]:
    q = UncertainQueue(tmp_path / "sub" / "queue.sqlite3", HashingEmbedder())
    yield q
    q.close()


def tasks(q: UncertainQueue, tenant: str) -> list[str]:
    return [u.task for u in q.pending(tenant)]


def test_add_and_pending_round_trip(queue: UncertainQueue) -> None:
    assert queue.add("t", "What is 17 * 23?", "391", 0.8, "m")
    [u] = queue.pending("t")
    assert (u.tenant, u.task, u.answer, u.uncertainty, u.model) == ("t", "What is 17 * 23?", "391", 0.8, "m")
    assert isinstance(u.id, int)
    assert u.samples == []


def test_live_samples_round_trip(queue: UncertainQueue) -> None:
    drawn = [Sample("17 * 23 = 391. The answer is 391.", "391", "stop", -0.05),
             Sample("Hmm", None, "length", None), Sample("print(17 * 23)", "391", "stop", -0.2, program=True)]
    assert queue.add("t", "What is 17 * 23?", "391", 0.8, "m", drawn)
    assert queue.pending("t")[0].samples == drawn


def test_a_queue_written_before_samples_were_kept_opens_and_reads(tmp_path: Path) -> None:
    """The column is added in place; the queries already queued read back with no samples."""
    path = tmp_path / "queue.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE uncertain (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, "
                     "task TEXT NOT NULL, answer TEXT NOT NULL DEFAULT '', uncertainty REAL NOT NULL, "
                     "model TEXT NOT NULL, vector BLOB NOT NULL, status TEXT NOT NULL DEFAULT 'pending', "
                     "created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);")
    db.execute("INSERT INTO uncertain (tenant, task, uncertainty, model, vector, created) VALUES (?,?,?,?,?,?)",
               ("t", "an old question", 0.7, "m",
                np.asarray(HashingEmbedder().embed(["an old question"])[0], dtype=np.float32).tobytes(), 1.0))
    db.commit()
    db.close()
    q = UncertainQueue(path, HashingEmbedder())
    try:
        [old] = q.pending("t")
        assert (old.task, old.samples) == ("an old question", [])
        assert q.add("t", "a new question with samples", "", 0.6, "m", [Sample("x", "1", "stop", -0.1)])
        assert [u.samples for u in q.pending("t")] == [[], [Sample("x", "1", "stop", -0.1)]]
    finally:
        q.close()


def test_near_duplicates_are_dropped(queue: UncertainQueue) -> None:
    assert queue.add("t", "How many legs does a spider have?", "", 0.7, "m")
    assert not queue.add("t", "How many legs does a spider have?", "", 0.9, "m")
    assert not queue.add("t", "how many LEGS does a spider have", "", 0.9, "m")  # case and punctuation
    assert queue.add("t", "Write a haiku about the autumn sea and its quiet boats.", "", 0.7, "m")
    assert queue.counts() == {"t": 2}


def test_dedup_threshold_is_configurable(tmp_path: Path) -> None:
    q = UncertainQueue(tmp_path / "q.sqlite3", HashingEmbedder(), dedup_similarity=1.01)
    try:
        assert q.add("t", "same question here", "", 0.7, "m")
        assert q.add("t", "same question here", "", 0.7, "m")  # above any cosine: nothing is a duplicate
        assert q.counts() == {"t": 2}
    finally:
        q.close()


def test_dedup_is_per_tenant(queue: UncertainQueue) -> None:
    assert queue.add("a", "What is the capital of Australia?", "", 0.7, "m")
    assert queue.add("b", "What is the capital of Australia?", "", 0.7, "m")
    assert queue.counts() == {"a": 1, "b": 1}
    assert tasks(queue, "a") == ["What is the capital of Australia?"]
    assert tasks(queue, "c") == []


def test_pending_orders_by_uncertainty_and_limits(queue: UncertainQueue) -> None:
    for i, u in enumerate([0.55, 0.95, 0.75]):
        queue.add("t", f"question number {i} about topic {i * 7}", "", u, "m")
    assert [u.uncertainty for u in queue.pending("t")] == [0.95, 0.75, 0.55]
    assert [u.uncertainty for u in queue.pending("t", limit=2)] == [0.95, 0.75]


def test_used_queries_leave_pending_and_free_their_slot(queue: UncertainQueue) -> None:
    queue.add("t", "What is the boiling point of water at sea level?", "", 0.7, "m")
    queue.add("t", "Name the largest planet in the solar system.", "", 0.6, "m")
    first = queue.pending("t")[0]
    queue.mark_used([first.id])
    queue.mark_used([])  # a no-op
    assert tasks(queue, "t") == ["Name the largest planet in the solar system."]
    assert queue.counts() == {"t": 1}
    # dedup looks at pending queries only: a used one may come back
    assert queue.add("t", first.task, "", 0.7, "m")
    assert queue.counts() == {"t": 2}
    queue.mark_used([u.id for u in queue.pending("t")])
    assert queue.counts() == {}


def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    q = UncertainQueue(path, HashingEmbedder())
    q.add("a", "What is the zorblat of cat?", "no idea", 0.9, "m")
    q.add("a", "Translate 'good morning' into Klingon please.", "", 0.6, "m")
    q.add("b", "What is the zorblat of cat?", "", 0.8, "m")
    q.mark_used([q.pending("a")[1].id])
    q.close()

    q = UncertainQueue(path, HashingEmbedder())
    try:
        assert q.counts() == {"a": 1, "b": 1}
        assert tasks(q, "a") == ["What is the zorblat of cat?"]
        assert q.pending("a")[0].answer == "no idea"
        assert not q.add("a", "What is the zorblat of cat?", "", 0.9, "m")  # dedup sees the reopened queue
        assert q.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert q.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        q.close()
