"""The SQLite side of the memory: the source of truth for experiences and their vectors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from memory.embedder import Vectors
from memory.store import Experience, ExperienceStore

DIM = 8


def vec(seed: int) -> Vectors:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ExperienceStore]:
    s = ExperienceStore(tmp_path / "sub" / "x.sqlite3")  # the folder is created
    yield s
    s.close()


def exp(task: str, answer: str = "a", score: float = 0.8, tenant: str = "t", **kw: object) -> Experience:
    return Experience(tenant=tenant, task=task, answer=answer, score=score, **kw)  # type: ignore[arg-type]


def test_wal_mode_and_full_sync(store: ExperienceStore) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_insert_assigns_ids_and_round_trips(store: ExperienceStore) -> None:
    rows = store.insert([(exp("q1", insights="i", workflow="w", source="strategy"), vec(1)),
                         (exp("q2", kind="pitfall", score=0.1), vec(2))])
    assert [r.id for r in rows] == [1, 2]
    got = store.get([1, 2])
    assert got[1].task == "q1" and got[1].insights == "i" and got[1].workflow == "w" and got[1].source == "strategy"
    assert got[2].kind == "pitfall" and got[2].score == pytest.approx(0.1)
    assert store.by_uid(rows[0].uid) is not None and store.by_uid("nope") is None
    pub = rows[0].public()
    assert pub["id"] == rows[0].uid and "uid" not in pub and pub["tenant"] == "t"
    assert store.get([]) == {}


def test_exact_duplicate_merges_keeping_the_best_score(store: ExperienceStore) -> None:
    first = store.insert([(exp("What is 2+2?", "4", score=0.5), vec(1))])[0]
    fid = first.id
    assert fid is not None
    # Same tenant, same task (case and outer spaces aside) and answer: no new row.
    again = store.insert([(exp("  what is 2+2? ", "4", score=0.9), vec(2))])[0]
    assert again.id == first.id and store.count() == 1
    assert store.get([fid])[fid].score == pytest.approx(0.9)
    store.insert([(exp("What is 2+2?", "4", score=0.2), vec(3))])
    assert store.get([fid])[fid].score == pytest.approx(0.9)  # never lowered
    # A different answer, or another tenant, is a different experience.
    store.insert([(exp("What is 2+2?", "5"), vec(4)), (exp("What is 2+2?", "4", tenant="u"), vec(5))])
    assert store.count() == 3 and store.count("t") == 2 and store.count("u") == 1
    # Duplicates within one batch collapse too.
    rows = store.insert([(exp("dup", "x"), vec(6)), (exp("dup", "x"), vec(7))])
    assert rows[0].id == rows[1].id and store.count() == 4


def test_merge_near_duplicate(store: ExperienceStore) -> None:
    row = store.insert([(exp("q", "old", score=0.5, insights="stale"), vec(1))])[0]
    assert row.id is not None
    kept = store.merge(row.id, exp("q!", "worse", score=0.3))
    assert kept is not None and kept.answer == "old" and kept.insights == "stale"
    better = store.merge(row.id, exp("q?", "new", score=0.9))
    assert better is not None and better.answer == "new" and better.insights == ""
    stored = store.get([row.id])[row.id]
    assert (stored.task, stored.answer, stored.insights) == ("q", "new", "")
    assert stored.score == pytest.approx(0.9)
    assert store.merge(999, exp("q", "x")) is None
    # The exact-duplicate key follows the answer: the new one merges, the replaced one is new again.
    assert store.insert([(exp("q", "new", score=0.95), vec(2))])[0].id == row.id
    assert store.insert([(exp("q", "old", score=0.99), vec(3))])[0].id != row.id
    assert store.get([row.id])[row.id].score == pytest.approx(0.95)


def test_eviction_order_lowest_score_then_least_recent(store: ExperienceStore) -> None:
    now = time.time()
    rows = store.insert([
        (exp("high", score=0.9, last_used=now - 100), vec(1)),
        (exp("low-old", score=0.2, last_used=now - 50), vec(2)),
        (exp("low-new", score=0.2, last_used=now - 10), vec(3)),
        (exp("mid", score=0.5, last_used=now - 1000), vec(4)),
        (exp("other tenant", score=0.0, tenant="u"), vec(5)),
    ])
    ids = {r.task: r.id for r in rows}
    assert store.evictable("t", 4) == []
    assert store.evictable("t", 3) == [ids["low-old"]]
    assert store.evictable("t", 2) == [ids["low-new"], ids["low-old"]]
    assert store.evictable("t", 0)[-1] == ids["low-old"]
    assert set(store.evictable("t", 0)) == {ids[k] for k in ("high", "low-old", "low-new", "mid")}
    # Use refreshes recency: the touched one is now the more recent of the two low scores.
    store.touch([ids["low-old"]])
    assert store.evictable("t", 3) == [ids["low-new"]]
    assert store.get([ids["low-old"]])[ids["low-old"]].uses == 1


def test_delete_and_delete_tenant(store: ExperienceStore) -> None:
    rows = store.insert([(exp(f"q{i}"), vec(i)) for i in range(3)] + [(exp("u1", tenant="u"), vec(9))])
    assert store.delete([rows[0].id]) == 1  # type: ignore[list-item]
    assert store.delete([rows[0].id]) == 0  # type: ignore[list-item]
    assert store.delete([]) == 0
    assert store.count("t") == 2
    assert sorted(store.delete_tenant("t")) == [rows[1].id, rows[2].id]
    assert store.count("t") == 0 and store.count("u") == 1
    # The freed digest can be stored again.
    assert store.insert([(exp("q1"), vec(1))])[0].id not in {r.id for r in rows}


def test_tenants_and_vectors(store: ExperienceStore) -> None:
    assert store.tenants() == {}
    ids, vecs = store.vectors("t")
    assert ids == [] and vecs.size == 0
    store.insert([(exp("a"), vec(1)), (exp("b", tenant="u"), vec(2)), (exp("c"), vec(3))])
    assert store.tenants() == {"t": (2, 3), "u": (1, 2)}
    ids, vecs = store.vectors("t")
    assert ids == [1, 3] and vecs.dtype == np.float32 and vecs.shape == (2, DIM)
    assert np.array_equal(vecs[0], vec(1)) and np.array_equal(vecs[1], vec(3))
    store.delete([3])
    assert store.tenants() == {"t": (1, 1), "u": (1, 2)}


def test_list_and_iter(store: ExperienceStore) -> None:
    store.insert([(exp(f"q{i}", tenant="t" if i % 2 else "u"), vec(i)) for i in range(6)])
    assert [r.task for r in store.list(None, 2, 0)] == ["q5", "q4"]
    assert [r.task for r in store.list("t", 10, 1)] == ["q3", "q1"]
    assert [r.task for r in store.iter_all("u")] == ["q0", "q2", "q4"]
    assert len(list(store.iter_all(None))) == 6


def test_committed_rows_survive_a_reopen(tmp_path: Path) -> None:
    s = ExperienceStore(tmp_path / "m.sqlite3")
    s.insert([(exp("kept"), vec(1))])
    s.close()
    s2 = ExperienceStore(tmp_path / "m.sqlite3")
    assert [r.task for r in s2.iter_all(None)] == ["kept"]
    s2.close()
