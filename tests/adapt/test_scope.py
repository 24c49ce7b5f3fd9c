"""adapt/scope.py: an adapter answers only questions near the ones it was trained on (``scope: near``),
with the hashing embedder (deterministic; the MiniLM one is measured in loadtest/adapter_scope.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from adapt.config import AdaptConfig
from adapt.follower import ReplicaAdaptation
from adapt.registry import AdapterRegistry
from adapt.scope import AdapterScope, coverage_threshold
from memory.embedder import HashingEmbedder
from protocol.events import EventBus
from server.settings import UpstreamSettings
from server.upstream import Upstream
from tests.adapt.conftest import BASE, Make, promote, train_examples
from tests.fakes.upstream import FakeUpstream

FAR = "Translate the French sentence 'le chat dort' into German, please."


def _scope(tmp_path: Path, mode: str = "near", threshold: float = 0.5,
           coverage: float | None = None) -> tuple[AdapterScope, AdapterRegistry]:
    reg = AdapterRegistry(tmp_path / "adapters.sqlite3")
    return AdapterScope(HashingEmbedder(), reg, mode=mode, threshold=threshold, coverage=coverage), reg


def _version(reg: AdapterRegistry, tmp_path: Path, tenant: str = "a") -> str:
    v = reg.new_version(tenant, BASE, tmp_path / "adapters", parent=None, data_hash="h", hyper={})
    reg.activate(v)
    return v.name


def test_a_question_near_the_training_ones_goes_to_the_adapter_a_far_one_to_the_base(tmp_path: Path) -> None:
    scope, reg = _scope(tmp_path)
    name = _version(reg, tmp_path)
    v = reg.get(name)
    assert v is not None
    assert scope.write(Path(v.path), [e.task for e in train_examples()]) == 4
    near, far = scope.embedder.embed(["Zorblat question 2?", FAR])
    got, sim, thr = scope.acquire("a", BASE, near)
    assert got == name and sim is not None and sim > 0.99 and thr == 0.5
    base, far_sim, _ = scope.acquire("a", BASE, far)
    assert base == BASE and far_sim is not None and far_sim < 0.5
    assert reg.in_flight(name) == 1 and reg.in_flight(BASE) == 1  # each counted where it went
    reg.release(name)
    reg.release(BASE)
    assert reg.in_flight(name) == 0 and reg.in_flight(BASE) == 0


def test_without_a_question_or_a_scope_file_the_adapter_answers_everything(tmp_path: Path) -> None:
    scope, reg = _scope(tmp_path)
    name = _version(reg, tmp_path)
    far = scope.embedder.embed([FAR])[0]
    assert scope.acquire("a", BASE, None) == (name, None, None)
    assert scope.acquire("a", BASE, far) == (name, None, None)  # trained before the option: no file


def test_only_near_mode_with_an_active_adapter_needs_the_question(tmp_path: Path) -> None:
    scope, reg = _scope(tmp_path)
    assert not scope.needs("a", BASE)  # nothing active: nothing to embed
    _version(reg, tmp_path)
    assert scope.needs("a", BASE) and not scope.needs("b", BASE)
    every, reg2 = _scope(tmp_path / "all", mode="all")
    _version(reg2, tmp_path / "all")
    assert not every.needs("a", BASE)


def test_a_version_trained_further_keeps_its_parents_questions(tmp_path: Path) -> None:
    scope, _ = _scope(tmp_path)
    parent, child = tmp_path / "v1", tmp_path / "v2"
    assert scope.write(parent, ["Zorblat question 1?", "Zorblat question 2?"]) == 2
    assert scope.write(child, ["Something else entirely", "Something else entirely", " "], parent_dir=parent) == 3
    vecs = np.load(child / scope.file)
    assert vecs.shape == (3, 384)
    assert not list(child.glob("*.tmp"))  # written whole, then renamed


def _unit(rows: list[list[float]]) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_the_coverage_threshold_is_the_kth_lowest_leave_one_out_similarity() -> None:
    # four questions at angles 0, 10, 20 and 60 degrees: nearest others 10, 10, 10 and 40 degrees away
    deg = np.radians([0.0, 10.0, 20.0, 60.0])
    vecs = np.stack([np.cos(deg), np.sin(deg)], axis=1).astype(np.float32)
    assert coverage_threshold(vecs, 0.95) is None  # k = floor(0.05 x 5) = 0: four questions cannot say
    assert coverage_threshold(vecs, 0.8) == pytest.approx(np.cos(np.radians(40.0)), abs=1e-6)  # k = 1: the loner
    nineteen = np.repeat(vecs, 5, axis=0) + np.arange(20, dtype=np.float32)[:, None] * 1e-4
    got = coverage_threshold(nineteen / np.linalg.norm(nineteen, axis=1, keepdims=True), 0.95)  # n = 20, k = 1
    assert got is not None and got > 0.99  # every question has a near twin


def test_the_coverage_threshold_is_the_same_computed_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(50, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    whole = coverage_threshold(vecs, 0.9)
    monkeypatch.setattr("adapt.scope._BLOCK", 7)  # 50 rows in 8 blocks, the last one short
    assert whole is not None and coverage_threshold(vecs, 0.9) == pytest.approx(whole)


def test_repeated_questions_are_not_their_own_neighbours() -> None:
    vecs = _unit([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1]])  # three distinct
    assert coverage_threshold(vecs, 0.5) == pytest.approx(np.cos(np.radians(45.0)), abs=1e-6)  # k = 2 of 3
    assert coverage_threshold(_unit([[1, 0], [1, 0]]), 0.1) is None  # one distinct question


def test_with_coverage_a_tight_scope_keeps_a_near_miss_out(tmp_path: Path) -> None:
    loose, _ = _scope(tmp_path / "loose", threshold=0.3)
    tight, reg = _scope(tmp_path / "tight", threshold=0.3, coverage=0.9)
    tight_scope = _unit([[1, 0.02 * i, 0] for i in range(20)])  # twenty questions, each ~1 degree from the next
    assert tight.threshold_of(tight_scope) > 0.999 and loose.threshold_of(tight_scope) == 0.3
    spread = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]] * 7)  # orthogonal: the floor holds
    assert tight.threshold_of(spread) == 0.3
    name = _version(reg, tmp_path / "tight")
    v = reg.get(name)
    assert v is not None
    Path(v.path).mkdir(parents=True)
    vecs = np.zeros((20, 384), dtype=np.float32)
    vecs[:, :3] = tight_scope
    np.save(Path(v.path) / tight.file, vecs)
    near_miss = np.zeros(384, dtype=np.float32)
    near_miss[:2] = _unit([[1, 1.6]])[0]  # ~0.80 from the nearest: over the floor, under the scope's own
    model, sim, thr = tight.acquire("a", BASE, near_miss)
    assert model == BASE and sim is not None and 0.3 < sim < 0.8 and thr is not None and thr > 0.999
    inside = np.zeros(384, dtype=np.float32)
    inside[:3] = tight_scope[7]
    assert tight.acquire("a", BASE, inside).model == name


def test_another_embedders_vectors_are_not_read(tmp_path: Path) -> None:
    scope, reg = _scope(tmp_path)
    name = _version(reg, tmp_path)
    v = reg.get(name)
    assert v is not None
    Path(v.path).mkdir(parents=True)
    np.save(Path(v.path) / "scope-all-MiniLM-L6-v2.npy", np.ones((2, 384), dtype=np.float32))
    assert scope.similarity(name, scope.embedder.embed([FAR])[0]) is None


async def test_a_cycle_with_scope_near_writes_the_scope_and_routes_by_it(make: Make,
                                                                         fake_upstream: FakeUpstream) -> None:
    svc = await make(scope="near", scope_similarity=0.5)
    name = await promote(svc, fake_upstream)
    job = next(j for j in svc.jobs.values() if j.adapter == name)
    assert job.report["scope"] == {"questions": 8, "similarity": 0.5, "file": "scope-hashing.npy"}  # 4 + 4 held out
    near = await svc.scope.embed("Zorblat question 3?", "a", BASE)
    far = await svc.scope.embed(FAR, "a", BASE)
    assert svc.scope.acquire("a", BASE, near)[0] == name
    assert svc.scope.acquire("a", BASE, far)[0] == BASE


async def test_a_cycle_with_coverage_reports_the_adapters_own_threshold(make: Make,
                                                                         fake_upstream: FakeUpstream) -> None:
    svc = await make(scope="near", scope_similarity=0.1, scope_coverage=0.5)
    name = await promote(svc, fake_upstream)
    report = next(j for j in svc.jobs.values() if j.adapter == name).report["scope"]
    assert report["coverage"] == 0.5 and report["similarity"] == 0.1
    v = svc.registry.get(name)
    assert v is not None
    expected = coverage_threshold(np.load(Path(v.path) / "scope-hashing.npy"), 0.5)
    assert expected is not None and report["threshold"] == pytest.approx(max(0.1, expected))
    near = await svc.scope.embed("Zorblat question 3?", "a", BASE)
    assert svc.scope.acquire("a", BASE, near).threshold == pytest.approx(report["threshold"])


async def test_a_cycle_with_scope_all_writes_none(make: Make, fake_upstream: FakeUpstream) -> None:
    svc = await make()
    name = await promote(svc, fake_upstream)
    v = svc.registry.get(name)
    assert v is not None and not (Path(v.path) / "scope-hashing.npy").exists()
    assert "scope" not in next(j for j in svc.jobs.values() if j.adapter == name).report


class _Loading(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.loads = threading.Event()

    def load(self) -> None:
        self.loads.set()


async def test_a_replica_preloads_the_scopes_embedder(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    emb = _Loading()
    up = Upstream(fake_upstream.url, UpstreamSettings())
    config = AdaptConfig(**{"enabled": True, "tenants": ["a"], "base_model_path": str(tmp_path), "scope": "near"})
    svc = ReplicaAdaptation(config, tmp_path / "adapt", up, EventBus(), embedder=emb, follow_s=60, not_primary="no")
    try:
        await svc.start(BASE)
        assert await asyncio.to_thread(emb.loads.wait, 10), "the replica did not load the scope's embedder"
    finally:
        await svc.stop()
        svc.registry.close()
        svc.queue.close()
        await up.aclose()
