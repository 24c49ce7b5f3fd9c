"""Contextual experience replay (CER; Liu et al., 2025) as a service.

Past experiences are distilled, stored, retrieved and replayed in the context window:
- ``recall`` embeds the query and searches the tenant's index (p99 target 15 ms at 100k);
- ``remember`` queues an experience; a writer task embeds and commits batches off the critical
  path (the returned future resolves once the batch is committed: that is the acknowledgement);
- a distiller then asks the upstream for insights and a generalised workflow, and stores them.
Heavy work runs in two worker threads (writes; recalls), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from memory.embedder import Embedder, make_embedder
from memory.importer import ImportReport, import_batch
from memory.index import IndexSet, TenantIndex
from memory.integrity import MemoryUnavailable, repair
from memory.store import Experience, ExperienceStore

log = logging.getLogger(__name__)


class Distiller(Protocol):
    """Turns a finished task into (insights, workflow); e.g. an upstream LLM call."""

    async def __call__(self, exp: Experience) -> tuple[str, str]: ...


@dataclass(frozen=True)
class MemoryConfig:
    """What the memory service needs from the settings."""

    directory: Path
    embedder: str = "minilm"
    embed_threads: int = 1
    max_entries_per_tenant: int = 10_000
    max_text_chars: int = 4_000
    dedup_similarity: float = 0.97
    hnsw_threshold: int = 20_000
    batch_size: int = 32
    queue_size: int = 10_000
    persist_interval_s: float = 30.0


@dataclass
class Hit:
    """A recalled experience and its similarity to the query."""

    experience: Experience
    similarity: float


class MemoryService:
    """Per-tenant experience memory: SQLite for truth, FAISS for search."""

    def __init__(self, config: MemoryConfig, *, embedder: Embedder | None = None,
                 distiller: Distiller | None = None) -> None:
        self.config = config
        self.embedder = embedder or make_embedder(config.embedder, threads=config.embed_threads)
        self.distiller = distiller
        self._write_pool = ThreadPoolExecutor(1, thread_name_prefix="memory-write")
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="memory-read")
        self._lock = threading.Lock()  # guards the FAISS indexes across the two threads
        self._queue: asyncio.Queue[tuple[Experience, asyncio.Future[Experience | None]]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._distilling: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._settled = asyncio.Event()  # ready, or failed to open
        self.failure: str | None = None
        self.lost: dict[str, dict[str, int]] = {}
        self.store: ExperienceStore | None = None
        self._reader: ExperienceStore | None = None
        self.indexes: IndexSet | None = None
        self.dropped = 0
        self.repaired: list[str] = []
        self._warming: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Opens the store, repairs the indexes and loads the embedder (in the worker thread:
        the server answers meanwhile, and recall returns nothing until ready)."""
        self._queue = asyncio.Queue(self.config.queue_size)
        self._tasks = [asyncio.create_task(self._boot_then_write()), asyncio.create_task(self._persist_loop())]

    async def _boot_then_write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._write_pool, self._open)
        except Exception as exc:
            self.failure = f"the memory database could not be opened ({type(exc).__name__}: {exc})"
            log.error("memory failed to open; memory calls are refused: %s", self.failure, exc_info=True)
            self._settled.set()
            self._fail_queued()
            return
        self._ready.set()
        self._settled.set()
        await self._write_loop()

    def _fail_queued(self) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(MemoryUnavailable(self.failure or "memory unavailable"))

    def _open(self) -> None:
        d = self.config.directory
        self.store = ExperienceStore(d / "experiences.sqlite3")
        self._reader = ExperienceStore(d / "experiences.sqlite3")
        self.indexes = IndexSet(d / "index", self.embedder.dim, self.config.hnsw_threshold)
        self._repair()
        # The embedding model (torch, ~10 s of CPU) loads on first use, not here: a proxy that
        # only passes requests through never pays for it.

    def _repair(self) -> None:
        assert self.store is not None and self.indexes is not None
        self.lost, self.repaired = repair(self.store, self.indexes)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Waits until the store is open; raises MemoryUnavailable at once if it failed to."""
        if self.failure is None:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        if self.failure is not None:
            raise MemoryUnavailable(self.failure)

    async def flush(self) -> None:
        """Waits until everything queued so far is committed (tests, shutdown)."""
        if self._queue is not None and self.ready:
            await self._queue.join()
        if self._distilling:
            await asyncio.gather(*self._distilling, return_exceptions=True)

    async def stop(self) -> None:
        for t in self._tasks if not self.ready else ():
            t.cancel()
        if not self.ready:
            # Still opening (loading the embedder): nothing was written yet, so do not wait for it.
            self._write_pool.shutdown(wait=False, cancel_futures=True)
            self._read_pool.shutdown(wait=False, cancel_futures=True)
            return
        await self.flush()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self.indexes is not None and self.indexes.dirty:
            await loop.run_in_executor(self._write_pool, self._persist)
        for store in (self.store, self._reader):
            if store is not None:
                await loop.run_in_executor(self._write_pool, store.close)
        self._write_pool.shutdown(wait=False)
        self._read_pool.shutdown(wait=False)

    # -- writes ------------------------------------------------------------------------------

    def remember(self, exp: Experience) -> asyncio.Future[Experience | None]:
        """Queues ``exp``; the future resolves to the stored row once committed (None if it was
        dropped because the queue is full). Never blocks."""
        fut: asyncio.Future[Experience | None] = asyncio.get_running_loop().create_future()
        if self.failure is not None:
            fut.set_exception(MemoryUnavailable(self.failure))
            return fut
        exp.task = exp.task[: self.config.max_text_chars]
        exp.answer = exp.answer[: self.config.max_text_chars]
        assert self._queue is not None, "memory not started"
        try:
            self._queue.put_nowait((exp, fut))
        except asyncio.QueueFull:
            self.dropped += 1
            fut.set_result(None)
        return fut

    async def _write_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.config.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                stored = await loop.run_in_executor(self._write_pool, self._write_batch, [e for e, _ in batch])
                for (_, fut), row in zip(batch, stored, strict=True):
                    if not fut.done():
                        fut.set_result(row)
                for row in stored:
                    if row is not None and self.distiller is not None and not row.insights:
                        t = asyncio.create_task(self._distill(row))
                        self._distilling.add(t)
                        t.add_done_callback(self._distilling.discard)
            except Exception as exc:
                log.exception("memory write failed")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write_batch(self, items: list[Experience]) -> list[Experience | None]:
        assert self.store is not None and self.indexes is not None
        vecs = self.embedder.embed([e.task for e in items])
        fresh: list[tuple[Experience, Any]] = []
        out: list[Experience | None] = [None] * len(items)
        slot: list[int] = []
        for i, (exp, vec) in enumerate(zip(items, vecs, strict=True)):
            with self._lock:
                near = self.indexes.get(exp.tenant).search(vec, 1)
            if near and near[0][1] >= self.config.dedup_similarity:
                # The same task again: one entry per task, holding the best-scored answer.
                row = self.store.merge(near[0][0], exp)
                if row is not None:
                    out[i] = row
                    continue
            fresh.append((exp, vec))
            slot.append(i)
        stored = self.store.insert(fresh)
        touched: set[str] = set()
        with self._lock:
            for i, row, (_, vec) in zip(slot, stored, fresh, strict=True):
                out[i] = row
                idx = self.indexes.get(row.tenant)
                if row.id is not None and row.id > idx.max_id:
                    idx.add([row.id], vec.reshape(1, -1))
                touched.add(row.tenant)
        for tenant in touched:
            self._evict(tenant)
            self.indexes.dirty.add(tenant)
        return out

    def _evict(self, tenant: str) -> None:
        assert self.store is not None and self.indexes is not None
        over = self.store.evictable(tenant, self.config.max_entries_per_tenant)
        if over:
            self.store.delete(over)
            with self._lock:
                self.indexes.get(tenant).remove(over)
        self._maybe_rebuild(tenant)

    def _maybe_rebuild(self, tenant: str) -> None:
        """Rebuilds a tenant's index grown past the HNSW threshold (or full of tombstones). The
        new index is built outside the lock (recalls go on with the old one) and swapped in:
        every index change happens in this (the write) thread, so nothing is missed meanwhile."""
        assert self.store is not None and self.indexes is not None
        with self._lock:
            due = self.indexes.get(tenant).needs_rebuild()
        if due:
            fresh = TenantIndex(self.embedder.dim, self.config.hnsw_threshold)
            fresh.rebuild(*self.store.vectors(tenant))
            with self._lock:
                self.indexes.tenants[tenant] = fresh

    async def _distill(self, row: Experience) -> None:
        assert self.distiller is not None
        try:
            insights, workflow = await self.distiller(row)
        except Exception as exc:  # an optional enrichment: never fatal
            log.info("distilling experience %s failed: %s", row.uid, exc)
            return
        if row.id is not None and (insights or workflow):
            store = self.store
            assert store is not None
            await asyncio.get_running_loop().run_in_executor(
                self._write_pool, store.update_insights, row.id, insights, workflow)

    def _persist(self) -> None:
        # Not under the lock: serialising and fsyncing a 100k-entry HNSW index (~180 MB) takes
        # seconds, and recalls would wait all that time. Only this (the write) thread changes
        # the indexes, so nothing changes while it writes; concurrent searches only read.
        assert self.indexes is not None
        self.indexes.persist()

    async def _persist_loop(self) -> None:
        await self._ready.wait()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.persist_interval_s)
            if self.indexes is not None and self.indexes.dirty:
                await loop.run_in_executor(self._write_pool, self._persist)

    # -- reads -------------------------------------------------------------------------------

    async def recall(self, tenant: str, query: str, *, k: int = 4, threshold: float = 0.35) -> list[Hit]:
        """The tenant's ``k`` most similar experiences above ``threshold``, deduplicated."""
        if not self.ready or not query.strip():
            return []
        loop = asyncio.get_running_loop()
        if not self.embedder.loaded:
            # Warming up: answer without memories now, and load the model in the background.
            if self._warming is None:
                self._warming = loop.run_in_executor(self._write_pool, self.embedder.load)
            return []
        hits = await loop.run_in_executor(self._read_pool, self._recall, tenant, query, k, threshold)
        if hits and self.store is not None:
            store = self.store
            loop.run_in_executor(self._write_pool, store.touch, [h.experience.id for h in hits if h.experience.id])
        return hits

    def _recall(self, tenant: str, query: str, k: int, threshold: float) -> list[Hit]:
        assert self._reader is not None and self.indexes is not None
        vec = self.embedder.embed([query[: self.config.max_text_chars]])[0]
        with self._lock:
            idx = self.indexes.tenants.get(tenant)
            found = idx.search(vec, k * 3) if idx is not None else []
        found = [(i, s) for i, s in found if s >= threshold]
        rows = self._reader.get([i for i, _ in found])
        seen: set[str] = set()
        out: list[Hit] = []
        for i, s in found:
            row = rows.get(i)
            if row is None or row.tenant != tenant:  # deleted meanwhile; tenant checked twice on purpose
                continue
            key = re.sub(r"\W+", " ", row.task.lower()).strip()
            if key in seen:
                continue
            seen.add(key)
            out.append(Hit(row, s))
            if len(out) == k:
                break
        return out

    # -- admin -------------------------------------------------------------------------------

    async def run(self, fn: Any, *args: Any) -> Any:
        """Runs a store operation in the write thread (admin routes)."""
        await self.wait_ready()
        return await asyncio.get_running_loop().run_in_executor(self._write_pool, fn, *args)

    async def import_experiences(self, items: list[Experience]) -> ImportReport:
        """Writes ``items`` all or none (see memory.importer); returns once committed."""
        for e in items:
            e.task, e.answer = e.task[: self.config.max_text_chars], e.answer[: self.config.max_text_chars]
        report: ImportReport = await self.run(self._import, items)
        return report

    def _import(self, items: list[Experience]) -> ImportReport:
        assert self.store is not None and self.indexes is not None
        if not items:
            return ImportReport()
        vecs = self.embedder.embed([e.task for e in items])
        report = import_batch(self.store, self.indexes, self._lock, items, vecs,
                              dedup_similarity=self.config.dedup_similarity,
                              max_entries=self.config.max_entries_per_tenant)
        for tenant in {e.tenant for e in items}:
            self._maybe_rebuild(tenant)
        self._persist()
        return report

    def delete_ids(self, uids: list[str]) -> int:
        assert self.store is not None and self.indexes is not None
        n = 0
        for uid in uids:
            row = self.store.by_uid(uid)
            if row is None or row.id is None:
                continue
            n += self.store.delete([row.id])
            with self._lock:
                self.indexes.get(row.tenant).remove([row.id])
            self.indexes.dirty.add(row.tenant)
            self._maybe_rebuild(row.tenant)
        if n:
            self._persist()  # the manifest's counts stay a floor for the loss check at start
        return n

    def delete_tenant(self, tenant: str) -> int:
        assert self.store is not None and self.indexes is not None
        ids = self.store.delete_tenant(tenant)
        with self._lock:
            self.indexes.drop(tenant)
        self._persist()
        return len(ids)

    def stats(self) -> dict[str, Any]:
        if self.failure is not None:
            return {"ready": False, "error": self.failure}
        if not self.ready or self.store is None or self.indexes is None:
            return {"ready": False}
        with self._lock:
            index = {t: {"size": i.size, "hnsw": i.hnsw} for t, i in self.indexes.tenants.items()}
        return {"ready": True, "entries": self.store.count(), "tenants": {t: c for t, (c, _) in
                                                                           self.store.tenants().items()},
                "index": index, "queued": self._queue.qsize() if self._queue else 0, "dropped": self.dropped,
                "repaired_at_start": self.repaired, "lost_at_start": self.lost, "embedder": self.embedder.name}
