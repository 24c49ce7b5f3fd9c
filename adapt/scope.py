"""Which requests an adapter answers: those near the questions it was trained on.

A LoRA trained on one tenant's uncertain queries changes the greedy answers to about a quarter of
unrelated questions as well, both ways (+13/-13 of 100 on average over sixteen measured cycles):
net zero within noise, but no bound on the loss can be shown without ~9,000 items
(README, "Adaptation, twelfth measurement"). With ``adapt.scope: near`` the adapter answers only
a request whose question is at least ``adapt.scope_similarity`` (cosine, the memory's
embedder) from one it was trained on; the tenant's other requests go to the base model, whose
answers the adapter then cannot change.

The scope is written beside the adapter's weights (``scope-<embedder>.npy``: the unit vectors of
its training and held-out questions) when it is trained with ``scope: near``, so it survives
restarts and replicas read the same file. An adapter without one (trained under ``scope: all``,
or before the option existed, or with another embedder) answers everything.

One threshold does not fit every adapter: 0.55 keeps other reasoning-gym families out, but an
adapter trained on one tight format (BIG-Bench-Hard's bracketed arithmetic, whose questions are
0.9+ from each other) also took 889 of 1,000 ``basic_arithmetic`` questions (0.55-0.82), where it
answered worse. With ``adapt.scope_coverage`` the threshold is raised per adapter to where its
own training questions sit (``coverage_threshold``), so a tight scope stays tight.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from adapt.registry import AdapterRegistry, AdapterVersion
from memory.embedder import Embedder, Vectors

log = logging.getLogger(__name__)
_BLOCK = 1024  # scope rows compared at once by coverage_threshold


class Route(NamedTuple):
    """Who answers a request (counted in flight), the question's similarity to the adapter's
    nearest training question and the threshold it was held to (both None: the scope did not decide)."""

    model: str
    similarity: float | None
    threshold: float | None


def coverage_threshold(vecs: Vectors, coverage: float) -> float | None:
    """The similarity a new question drawn like the scope's own reaches with probability at least
    ``coverage``: each scope question's similarity to its nearest *other* one (leave one out),
    and the k-th lowest of those n with k = floor((1 - coverage)(n + 1)) (split-conformal; a new
    question is compared with all n, which only raises its similarity, so the bound holds).
    None when the scope is too small for that coverage (k < 1) or has under two distinct questions."""
    rows = np.unique(vecs, axis=0) if vecs.shape[0] else vecs  # a repeated question is not its own neighbour
    n = rows.shape[0]
    k = int(np.floor((1.0 - coverage) * (n + 1) + 1e-9))
    if n < 2 or k < 1:
        return None
    nearest = np.empty(n, dtype=np.float32)
    for i in range(0, n, _BLOCK):  # in blocks: a scope grown over many cycles stays a few MB at a time
        sims = rows[i:i + _BLOCK] @ rows.T
        sims[np.arange(sims.shape[0]), np.arange(i, i + sims.shape[0])] = -np.inf
        nearest[i:i + _BLOCK] = sims.max(axis=1)
    return float(np.sort(nearest)[k - 1])


def scope_threshold(vecs: Vectors, floor: float, coverage: float | None) -> float:
    """The similarity a question needs to reach an adapter whose scope is ``vecs``: ``floor``
    (``adapt.scope_similarity``), raised to ``coverage_threshold`` where ``coverage`` is set."""
    tight = coverage_threshold(vecs, coverage) if coverage is not None else None
    return floor if tight is None else max(floor, tight)


class AdapterScope:
    """Routes a tenant's request to its adapter only when the question is near the adapter's.

    ``write`` embeds and saves a new version's questions (the trainer's side). On a request:
    ``needs`` says whether its question must be embedded at all (only with ``scope: near`` and an
    active adapter: nobody else pays for it), ``embed`` does so on this object's own thread (the
    model never runs on the event loop), and ``acquire`` picks the adapter or the base model with
    the routes as they are then and counts the request in flight, like the registry's
    ``acquire``. An adapter with no scope file answers every request, as with ``scope: all``.
    ``threshold`` is the floor; with ``coverage`` an adapter's own is the higher of it and
    ``coverage_threshold`` of its questions.
    """

    def __init__(self, embedder: Embedder, registry: AdapterRegistry, *, mode: str, threshold: float,
                 coverage: float | None = None) -> None:
        self.embedder = embedder
        self.registry = registry
        self.mode = mode
        self.threshold = threshold
        self.coverage = coverage
        self._vectors: dict[str, Vectors | None] = {}  # None: the version has no scope file
        self._thresholds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapt-scope")
        self.file = f"scope-{embedder.name}.npy"  # vectors of another embedder would not compare

    def write(self, adapter_dir: Path, questions: list[str], *, parent_dir: Path | None = None) -> int:
        """Saves the scope of the version in ``adapter_dir`` (blocking: run it off the loop); a
        version trained further from a parent also covers the parent's questions. Returns how
        many questions it holds."""
        return int(self._write(adapter_dir, questions, parent_dir).shape[0])

    def _write(self, adapter_dir: Path, questions: list[str], parent_dir: Path | None) -> Vectors:
        unique = list(dict.fromkeys(q for q in questions if q.strip()))
        vecs = self.embedder.embed(unique) if unique else np.zeros((0, self.embedder.dim), dtype=np.float32)
        parent = _read(parent_dir / self.file) if parent_dir is not None else None
        if parent is not None and parent.shape[1] == vecs.shape[1]:
            vecs = np.concatenate([parent, vecs])
        adapter_dir.mkdir(parents=True, exist_ok=True)
        tmp = adapter_dir / (self.file + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, vecs.astype(np.float32))
        tmp.replace(adapter_dir / self.file)  # whole or not at all: a reader never sees half a file
        return vecs

    def threshold_of(self, vecs: Vectors) -> float:
        """The similarity a question needs to reach the adapter whose scope is ``vecs``."""
        return scope_threshold(vecs, self.threshold, self.coverage)

    async def save(self, adapter_dir: str, questions: list[str], parent: AdapterVersion | None) -> dict[str, Any]:
        """``write`` on this object's thread; what the job's report says of the scope."""
        parent_dir = Path(parent.path) if parent is not None else None
        vecs = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: self._write(Path(adapter_dir), questions, parent_dir))
        out: dict[str, Any] = {"questions": int(vecs.shape[0]), "similarity": self.threshold, "file": self.file}
        if self.coverage is not None:
            out |= {"coverage": self.coverage, "threshold": self.threshold_of(vecs)}
        return out

    def needs(self, tenant: str, base: str) -> bool:
        return self.mode == "near" and self.registry.active(tenant, base) is not None

    async def embed(self, question: str, tenant: str, base: str) -> Vectors:
        """The unit vector of a request's question, on this object's thread, where the active
        adapter's scope file is also read the first time (no file I/O on the event loop)."""
        name = self.registry.active(tenant, base)

        def work() -> Vectors:
            if name is not None:
                self._scope_of(name)
            out: Vectors = self.embedder.embed([question])[0]
            return out

        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def acquire(self, tenant: str, base: str, question: Vectors | None) -> Route:
        """The model that answers (counted in flight), with the similarity and threshold that decided."""
        name = self.registry.active(tenant, base)
        sim = self.similarity(name, question) if name is not None and question is not None else None
        if name is None or sim is None:
            return Route(self.registry.acquire(tenant, base), None, None)
        thr = self._thresholds.get(name, self.threshold)  # similarity() has read the scope and set it
        if sim < thr:
            return Route(self.registry.acquire(tenant, base, adapter=False), sim, thr)
        return Route(self.registry.acquire(tenant, base), sim, thr)

    def similarity(self, name: str, vec: Vectors) -> float | None:
        """Cosine similarity of ``vec`` to the nearest question ``name`` was trained on; None when
        the version has no scope. A few dozen rows: cheap enough inline (``embed`` has read them)."""
        vecs = self._scope_of(name)
        if vecs is None or vecs.shape[0] == 0 or vecs.shape[1] != vec.shape[0]:
            return None
        return float(np.max(vecs @ vec))

    def _scope_of(self, name: str) -> Vectors | None:
        """``name``'s vectors, read from its folder once (None: it has no scope file)."""
        with self._lock:
            if name not in self._vectors:
                v = self.registry.get(name)
                vecs = self._vectors[name] = _read(Path(v.path) / self.file) if v is not None else None
                if vecs is None:
                    log.info("adapter %s has no scope file: it answers every request of its tenant", name)
                else:
                    self._thresholds[name] = self.threshold_of(vecs)
            return self._vectors[name]

    def preload(self) -> None:
        """Loads the embedding model in the background, so the first routed request does not wait."""
        if self.mode == "near":
            self._pool.submit(self.embedder.load)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _read(path: Path) -> Vectors | None:
    try:
        vecs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("unreadable adapter scope %s: %s", path, exc)
        return None
    return vecs if vecs.ndim == 2 else None
