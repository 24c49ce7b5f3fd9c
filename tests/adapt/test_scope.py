"""adapt/scope.py: an adapter answers only questions near the ones it was trained on (``scope: near``),
with the hashing embedder (deterministic; the MiniLM one is measured in loadtest/adapter_scope.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np

from adapt.config import AdaptConfig
from adapt.follower import ReplicaAdaptation
from adapt.registry import AdapterRegistry
from adapt.scope import AdapterScope
from memory.embedder import HashingEmbedder
from protocol.events import EventBus
from server.settings import UpstreamSettings
from server.upstream import Upstream
from tests.adapt.conftest import BASE, Make, promote, train_examples
from tests.fakes.upstream import FakeUpstream

FAR = "Translate the French sentence 'le chat dort' into German, please."


def _scope(tmp_path: Path, mode: str = "near", threshold: float = 0.5) -> tuple[AdapterScope, AdapterRegistry]:
    reg = AdapterRegistry(tmp_path / "adapters.sqlite3")
    return AdapterScope(HashingEmbedder(), reg, mode=mode, threshold=threshold), reg


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
    got, sim = scope.acquire("a", BASE, near)
    assert got == name and sim is not None and sim > 0.99
    base, far_sim = scope.acquire("a", BASE, far)
    assert base == BASE and far_sim is not None and far_sim < 0.5
    assert reg.in_flight(name) == 1 and reg.in_flight(BASE) == 1  # each counted where it went
    reg.release(name)
    reg.release(BASE)
    assert reg.in_flight(name) == 0 and reg.in_flight(BASE) == 0


def test_without_a_question_or_a_scope_file_the_adapter_answers_everything(tmp_path: Path) -> None:
    scope, reg = _scope(tmp_path)
    name = _version(reg, tmp_path)
    far = scope.embedder.embed([FAR])[0]
    assert scope.acquire("a", BASE, None) == (name, None)
    assert scope.acquire("a", BASE, far) == (name, None)  # trained before the option: no file


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
