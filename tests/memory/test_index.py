"""Per-tenant FAISS indexes: exact then HNSW, tombstones, and crash-safe persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from memory.embedder import Vectors
from memory.index import IndexSet, TenantIndex, atomic_write

DIM = 16


def vecs(n: int, seed: int = 0) -> Vectors:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    out: Vectors = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def test_flat_search_is_exact_and_ranked() -> None:
    idx = TenantIndex(DIM, hnsw_threshold=1000)
    v = vecs(50)
    idx.add(list(range(1, 51)), v)
    assert idx.size == 50 and idx.max_id == 50 and not idx.hnsw
    hits = idx.search(v[9], 5)
    assert hits[0][0] == 10 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    brute = sorted(range(50), key=lambda i: -float(v[i] @ v[9]))[:5]
    assert [i for i, _ in hits] == [i + 1 for i in brute]
    assert TenantIndex(DIM, 10).search(v[0], 3) == []  # empty
    idx.add([], v[:0])  # a no-op
    assert idx.size == 50


def test_flat_remove() -> None:
    idx = TenantIndex(DIM, hnsw_threshold=1000)
    v = vecs(10)
    idx.add(list(range(1, 11)), v)
    idx.remove([3, 4])
    idx.remove([])
    assert idx.size == 8 and not idx.tombstones
    assert all(i not in (3, 4) for i, _ in idx.search(v[2], 10))
    assert idx.vector(3) is None
    assert np.allclose(idx.vector(5), v[4])  # type: ignore[arg-type]


def test_rebuild_turns_hnsw_past_the_threshold() -> None:
    idx = TenantIndex(DIM, hnsw_threshold=64)
    v = vecs(100, seed=1)
    idx.add(list(range(1, 64)), v[:63])
    assert not idx.needs_rebuild()
    idx.add([64], v[63:64])
    assert idx.needs_rebuild()  # flat at the threshold
    idx.rebuild(list(range(1, 101)), v)
    assert idx.hnsw and idx.size == 100 and idx.max_id == 100 and not idx.needs_rebuild()
    for q in (0, 42, 99):
        assert idx.search(v[q], 1)[0][0] == q + 1
    # Below the threshold again: back to exact.
    idx.rebuild(list(range(1, 11)), v[:10])
    assert not idx.hnsw and idx.size == 10


def test_hnsw_tombstones_are_filtered_until_the_rebuild() -> None:
    idx = TenantIndex(DIM, hnsw_threshold=32)
    v = vecs(100, seed=2)
    idx.rebuild(list(range(1, 101)), v)
    assert idx.hnsw
    idx.remove([5, 6, 7])
    assert idx.tombstones == {5, 6, 7} and idx.size == 97
    assert all(i not in (5, 6, 7) for i, _ in idx.search(v[4], 10))
    assert len(idx.search(v[4], 10)) == 10  # tombstoned hits are made up for
    assert not idx.needs_rebuild()
    idx.remove(list(range(10, 40)))  # over 20% deleted: time to rebuild
    assert idx.needs_rebuild()
    keep = [i for i in range(1, 101) if i not in idx.tombstones]
    idx.rebuild(keep, v[[i - 1 for i in keep]])
    assert not idx.tombstones and idx.size == len(keep) and idx.hnsw


def test_persist_and_load_round_trip(tmp_path: Path) -> None:
    s = IndexSet(tmp_path / "idx", DIM, hnsw_threshold=40)
    v = vecs(60, seed=3)
    s.get("a").add(list(range(1, 11)), v[:10])
    s.get("b").rebuild(list(range(11, 61)), v[10:])  # HNSW
    s.get("b").remove([20])
    s.dirty.update({"a", "b"})
    s.persist()
    assert not s.dirty
    manifest = s.read_manifest()
    assert manifest["a"] == {"file": IndexSet._file("a"), "count": 10, "max_id": 10, "hnsw": False, "tombstones": []}
    assert manifest["b"]["hnsw"] and manifest["b"]["tombstones"] == [20] and manifest["b"]["count"] == 49
    assert IndexSet._file("a") != IndexSet._file("b")  # file names are hashes: any tenant string is safe

    s2 = IndexSet(tmp_path / "idx", DIM, hnsw_threshold=40)
    a = s2.load("a", manifest["a"])
    b = s2.load("b", manifest["b"])
    assert a is not None and b is not None
    assert (a.size, a.max_id, a.hnsw) == (10, 10, False)
    assert (b.size, b.max_id, b.hnsw, b.tombstones) == (49, 60, True, {20})
    assert a.search(v[3], 1)[0][0] == 4
    assert b.search(v[30], 1)[0][0] == 31
    assert all(i != 20 for i, _ in b.search(v[9], 5))
    assert s2.tenants.keys() == {"a", "b"}

    # An index of another dimension (the embedder changed) is not used.
    assert IndexSet(tmp_path / "idx", DIM * 2, 40).load("a", manifest["a"]) is None
    # A missing or corrupt file reads as "no index" (the service then rebuilds from SQLite).
    (tmp_path / "idx" / manifest["a"]["file"]).write_bytes(b"not an index")
    assert IndexSet(tmp_path / "idx", DIM, 40).load("a", manifest["a"]) is None
    (tmp_path / "idx" / manifest["b"]["file"]).unlink()
    assert IndexSet(tmp_path / "idx", DIM, 40).load("b", manifest["b"]) is None


def test_persist_drops_emptied_tenants(tmp_path: Path) -> None:
    s = IndexSet(tmp_path, DIM, 100)
    s.get("a").add([1], vecs(1))
    s.dirty.add("a")
    s.persist()
    f = tmp_path / IndexSet._file("a")
    assert f.exists()
    s.drop("a")
    s.persist()
    assert not f.exists() and s.read_manifest() == {}


def test_unreadable_manifest_reads_as_empty(tmp_path: Path) -> None:
    s = IndexSet(tmp_path, DIM, 100)
    assert s.read_manifest() == {}
    (tmp_path / "manifest.json").write_text("{truncated")
    assert s.read_manifest() == {}
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert s.read_manifest() == {}


def test_load_tolerates_a_malformed_manifest_entry(tmp_path: Path) -> None:
    s = IndexSet(tmp_path, DIM, 100)
    for entry in ({}, {"file": 7}, {"file": "../nope"}, "x", None):
        assert s.load("a", entry) is None  # type: ignore[arg-type]


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    atomic_write(p, b"one")
    atomic_write(p, b"two two")
    assert p.read_bytes() == b"two two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind


def test_atomic_write_crash_before_rename_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    p = tmp_path / "manifest.json"
    atomic_write(p, json.dumps({"v": 1}).encode())

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr("memory.index.os.replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write(p, json.dumps({"v": 2, "big": "x" * 100_000}).encode())
    assert json.loads(p.read_bytes()) == {"v": 1}  # the old content, intact
    monkeypatch.undo()
    # The leftover temporary is overwritten by the next write, never read as the file.
    atomic_write(p, b'{"v": 3}')
    assert json.loads(p.read_bytes()) == {"v": 3}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["manifest.json"]


def test_persist_crash_leaves_a_loadable_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = IndexSet(tmp_path, DIM, 100)
    v = vecs(5)
    s.get("a").add([1, 2, 3], v[:3])
    s.dirty.add("a")
    s.persist()
    before = s.read_manifest()
    s.get("a").add([4, 5], v[3:])
    s.dirty.add("a")
    monkeypatch.setattr("memory.index.os.replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        s.persist()
    monkeypatch.undo()
    after = IndexSet(tmp_path, DIM, 100)
    assert after.read_manifest() == before
    loaded = after.load("a", before["a"])
    assert loaded is not None and loaded.size == 3 and loaded.max_id == 3
