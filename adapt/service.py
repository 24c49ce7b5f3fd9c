"""The adaptation loop (TT-SI; Huang et al., "Large Language Models Can Self-Improve").

detect (uncertain requests -> durable queue) -> synthesize (siblings + verified best_of_n answers)
-> train (LoRA in a separate process) -> gate (held-out split, new vs current) -> swap (load under
a new immutable name, switch the route atomically, unload the old version once idle) -> roll back
(by hand, or when live confidence drops after a promotion). One cycle at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapt import data as datamod
from adapt.config import AdaptConfig
from adapt.gate import evaluate
from adapt.queue import UncertainQueue
from adapt.registry import AdapterRegistry, AdapterVersion
from adapt.trainer import LocalProcessTrainer, Trainer, TrainJob
from memory.embedder import Embedder, HashingEmbedder
from protocol.errors import InvalidRequest, NotFound, SharpenError, UpstreamStatusError
from protocol.events import EventBus, RequestEvent
from protocol.upstream import AdapterHost, UpstreamAPI

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One adaptation cycle, as the admin API reports it."""

    id: str
    tenant: str
    base: str
    status: str = "queued"  # queued, running, succeeded, rejected, failed, cancelled
    stage: str = "queued"  # synthesize, train, load, gate, swap, done
    created: float = field(default_factory=time.time)
    finished: float | None = None
    adapter: str | None = None
    examples: int = 0
    heldout: int = 0
    score_new: float | None = None
    score_old: float | None = None
    error: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class AdaptationService:
    """Owns the queue, the adapter registry, the jobs and the routes to active adapters."""

    def __init__(self, config: AdaptConfig, directory: Path, upstream: AdapterHost, events: EventBus, *,
                 embedder: Embedder | None = None, trainer: Trainer | None = None,
                 teacher: UpstreamAPI | None = None) -> None:
        self.config = config
        self.dir = directory.absolute()
        self.upstream = upstream
        self.teacher = teacher
        self.events = events
        self.trainer = trainer or LocalProcessTrainer()
        self.registry = AdapterRegistry(directory / "adapters.sqlite3", shared=config.shared)
        self.queue = UncertainQueue(directory / "queue.sqlite3", embedder or HashingEmbedder(),
                                    dedup_similarity=config.dedup_similarity)
        self.jobs: dict[str, Job] = {}
        self.base: str | None = None  # the upstream's base model name, set at start
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapt")
        self._running: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: asyncio.Queue[RequestEvent] | None = None
        self._live: dict[str, deque[float]] = {}
        self._last_cycle = time.monotonic()
        self.models_changed: Callable[[], Awaitable[None]] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, base: str | None) -> None:
        self.base = base
        for v in self.registry.restore():
            try:
                await self._load(v)
                self.registry.activate(v)
            except SharpenError as exc:
                log.warning("could not restore adapter %s: %s", v.name, exc.message)
        self._sub = self.events.subscribe()
        self._tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._schedule())]

    async def stop(self) -> None:
        if self._sub is not None:
            self.events.unsubscribe(self._sub)
        for t in [*self._tasks, *([self._running] if self._running else [])]:
            t.cancel()
        await asyncio.gather(*self._tasks, *([self._running] if self._running else []), return_exceptions=True)
        self._pool.shutdown(wait=False)

    def opted_in(self, tenant: str) -> bool:
        return "*" in self.config.tenants or tenant in self.config.tenants

    # -- detect ------------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        while True:
            ev = await self._sub.get()
            try:
                self._watch_live(ev)
                u = ev.uncertainty
                if u is None or u.score < self.config.uncertainty_threshold or not self.opted_in(ev.tenant):
                    continue
                task = next((str(m.get("content")) for m in reversed(ev.messages) if m.get("role") == "user"), "")
                if task:
                    await loop.run_in_executor(self._pool, self.queue.add, ev.tenant, task, ev.answer or "",
                                               u.score, ev.model)
            except Exception:
                log.exception("queueing an uncertain query failed")

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(5.0)
            if self._running is not None and not self._running.done():
                continue
            try:
                counts = await loop.run_in_executor(self._pool, self.queue.counts)
                period = self.config.period_s
                due = period is not None and time.monotonic() - self._last_cycle >= period
                for tenant, n in counts.items():
                    if self.opted_in(tenant) and (n >= self.config.queue_trigger or (due and n > 0)):
                        self.run_cycle(tenant)
                        break
            except Exception as exc:  # e.g. no base_model_path: say so, and keep the scheduler alive
                self._last_cycle = time.monotonic()
                log.warning("could not start an adaptation cycle: %s",
                            exc.message if isinstance(exc, SharpenError) else repr(exc))

    # -- the cycle ---------------------------------------------------------------------------

    def run_cycle(self, tenant: str, *, examples: list[datamod.Example] | None = None,
                  heldout: list[datamod.Example] | None = None) -> Job:
        """Starts a cycle now (one at a time); returns its job."""
        if self._running is not None and not self._running.done():
            raise InvalidRequest("An adaptation cycle is already running.", code="adaptation_busy")
        if not self.config.base_model_path:
            raise InvalidRequest("Adaptation needs adapt.base_model_path (the base model's Hugging Face folder).",
                                 code="adaptation_unavailable")
        if self.base is None:
            raise InvalidRequest("The upstream's base model is not known yet.", code="adaptation_unavailable")
        job = Job(id=uuid.uuid4().hex[:12], tenant=tenant, base=self.base)
        self.jobs[job.id] = job
        self._last_cycle = time.monotonic()
        self._running = asyncio.create_task(self._cycle(job, examples, heldout))
        return job

    async def _cycle(self, job: Job, examples: list[datamod.Example] | None,
                     heldout: list[datamod.Example] | None) -> None:
        s = self.config
        loop = asyncio.get_running_loop()
        version: AdapterVersion | None = None
        used: list[int] = []
        job.status = "running"
        try:
            if examples is None:
                job.stage = "synthesize"
                pending = await loop.run_in_executor(self._pool, self.queue.pending, job.tenant, s.max_queries)
                used = [q.id for q in pending]
                queries = [(q.id, q.task) for q in pending]
                examples = await datamod.synthesize(self.upstream, job.base, job.tenant, queries, s,
                                                    answerer=self.teacher, answer_model=s.teacher_model)
            if heldout is None:
                examples, heldout = datamod.split(examples, s.holdout_fraction)
            job.examples, job.heldout = len(examples), len(heldout)
            if not examples or not heldout:
                raise InvalidRequest(f"not enough verified examples to train and gate ({len(examples)} train, "
                                     f"{len(heldout)} held out)")
            job.stage = "train"
            current = self.registry.active(job.tenant, job.base)
            hyper = {"rank": s.rank, "alpha": s.alpha, "target_modules": s.target_modules, "learning_rate":
                     s.learning_rate, "epochs": s.epochs, "max_steps": s.max_steps, "batch_size": s.batch_size,
                     "threads": s.threads}
            dh = datamod.data_hash(examples)
            version = self.registry.new_version(job.tenant, job.base, self.dir / "adapters", parent=current,
                                                data_hash=dh, hyper=hyper)
            job.adapter = version.name
            jdir = self.dir / "jobs" / job.id
            jdir.mkdir(parents=True, exist_ok=True)
            ex_file = jdir / "train.jsonl"
            ex_file.write_text("".join(json.dumps(e.chat()) + "\n" for e in examples))
            (jdir / "heldout.jsonl").write_text("".join(json.dumps(e.__dict__) + "\n" for e in heldout))
            tj = TrainJob(job_dir=str(jdir), base_model_path=str(s.base_model_path), examples=str(ex_file),
                          out_dir=version.path, data_hash=dh, hyper=hyper)
            self._train_job = tj
            outcome = await self.trainer.run(tj)
            job.train = outcome.progress
            if not outcome.ok:
                self.registry.update(version.name, status=outcome.status, note=outcome.error or "")
                job.status, job.error = ("cancelled" if outcome.status == "cancelled" else "failed"), outcome.error
                return
            name_base_model(Path(version.path), job.base)
            job.stage = "load"
            await self._load(version)
            job.stage = "gate"
            gate = await evaluate(self.upstream, version.name, current or job.base, job.base, heldout, s.gate_margin)
            job.score_new, job.score_old = gate.score_new, gate.score_old
            self.registry.update(version.name, score_new=gate.score_new, score_old=gate.score_old)
            (jdir / "gate.json").write_text(json.dumps(gate.items))
            if not gate.promote:
                self.registry.update(version.name, status="rejected",
                                     note=f"{gate.score_new:.3f} < {gate.score_old:.3f} + {s.gate_margin}")
                job.status = "rejected"
                await self._unload_when_idle(version.name)
                return
            job.stage = "swap"
            self._promote(version)
            job.status = "succeeded"
        except asyncio.CancelledError:
            job.status = "cancelled"
            if version is not None:
                self.registry.update(version.name, status="cancelled")
                if job.stage == "gate":  # loaded for the gate: do not leave it in vLLM
                    self._spawn(self._unload_when_idle(version.name))
            raise
        except Exception as exc:
            job.status = "failed"
            job.error = exc.message if isinstance(exc, SharpenError) else f"{type(exc).__name__}: {exc}"
            log.warning("adaptation job %s failed: %s", job.id, job.error)
            if version is not None:
                self.registry.update(version.name, status="failed", note=job.error)
                if job.stage == "gate":
                    self._spawn(self._unload_when_idle(version.name))
        finally:
            if used and job.status in ("succeeded", "rejected", "failed"):
                # Consumed by this attempt whatever its outcome: left pending, the same queries
                # would start the same cycle again at the scheduler's next tick, forever.
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(self._pool, self.queue.mark_used, used)
            job.stage = "done"
            job.finished = time.time()

    def progress(self, job: Job) -> dict[str, Any]:
        out = job.public()
        tj = getattr(self, "_train_job", None)
        if job.stage == "train" and tj is not None:
            out["train"] = self.trainer.progress(tj)
        return out

    async def cancel(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"No adaptation job '{job_id}'.")
        if job.finished is not None:
            return  # over already; the running cycle (if any) is another job's
        tj = getattr(self, "_train_job", None)
        if job.stage == "train" and tj is not None:
            await self.trainer.cancel(tj)
        elif self._running is not None and not self._running.done():
            self._running.cancel()

    # -- swap and roll back ------------------------------------------------------------------

    async def _load(self, v: AdapterVersion) -> None:
        try:
            await self.upstream.load_lora_adapter(v.name, v.path)  # absolute: vLLM needs it so
        except UpstreamStatusError as exc:
            if exc.http_status != 400 or "already" not in exc.message.lower():
                raise
        await self._models_changed()

    async def _models_changed(self) -> None:
        """Lets the proxy's model list know at once (it otherwise refreshes on a miss)."""
        if self.models_changed is not None:
            try:
                await self.models_changed()
            except Exception:  # the list is a cache; the next miss refreshes it anyway
                log.exception("refreshing the model list failed")

    def _promote(self, v: AdapterVersion) -> None:
        old = self.registry.activate(v)  # from here on, new requests go to v
        self.registry.update(v.name, status="active", promoted_at=time.time())
        self._live[v.name] = deque(maxlen=self.config.rollback_window)
        if old is not None and old != v.name:
            self.registry.update(old, status="retired")
            self._spawn(self._unload_when_idle(old))
        log.info("adapter %s promoted (replaces %s)", v.name, old or "the base model")

    async def rollback(self, tenant: str, reason: str = "by hand") -> dict[str, Any]:
        """Routes back to the previous version (or the base) and unloads the current one."""
        base = self.base or ""
        current = self.registry.active(tenant, base)
        if current is None:
            raise NotFound(f"Tenant '{tenant}' has no active adapter to roll back.")
        cur = self.registry.get(current)
        prev = self.registry.get(cur.parent) if cur is not None and cur.parent else None
        if prev is not None:
            await self._load(prev)
            self.registry.activate(prev)
            self.registry.update(prev.name, status="active")
        else:
            self.registry.deactivate(tenant, base)
        self.registry.update(current, status="rolled_back", note=reason)
        self._spawn(self._unload_when_idle(current))
        log.warning("adapter %s rolled back (%s); now serving %s", current, reason, prev.name if prev else base)
        return {"rolled_back": current, "now": prev.name if prev else base, "reason": reason}

    def _watch_live(self, ev: RequestEvent) -> None:
        """Automatic roll back: live confidence on a new adapter well below its gate score."""
        window = self._live.get(ev.model)
        if window is None or ev.uncertainty is None:
            return
        window.append(1.0 - ev.uncertainty.score)
        v = self.registry.get(ev.model)
        if v is None or v.score_new is None or window.maxlen is None or len(window) < window.maxlen:
            return
        live = sum(window) / len(window)
        if live < v.score_new - self.config.rollback_drop:
            self._live.pop(ev.model, None)
            self._spawn(self.rollback(v.tenant, reason=f"live confidence {live:.3f} < gate {v.score_new:.3f}"))

    async def _unload_when_idle(self, name: str, timeout: float = 120.0) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.registry.idle(name)
        try:
            await self.upstream.unload_lora_adapter(name)
            await self._models_changed()
        except SharpenError as exc:
            log.info("unloading %s: %s", name, exc.message)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.append(t)
        t.add_done_callback(lambda done: self._tasks.remove(done) if done in self._tasks else None)

    # -- routing (called by the proxy on every request) --------------------------------------

    def visible(self, tenant: str, model: str) -> bool:
        return self.registry.visible(tenant, model)

    def acquire(self, tenant: str, model: str) -> str:
        return self.registry.acquire(tenant, model)

    def release(self, name: str) -> None:
        self.registry.release(name)

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "base": self.base, "tenants": self.config.tenants,
                "queue": self.queue.counts(), "running": self._running is not None and not self._running.done(),
                "jobs": len(self.jobs)}


def name_base_model(adapter_dir: Path, served_base: str) -> None:
    """Records the served base model's name in ``adapter_config.json``: vLLM's filesystem
    resolver (replicas pulling adapters from shared storage) only serves an adapter whose
    ``base_model_name_or_path`` matches the base model a request names. The training-time path
    stays in ``lineage.json``."""
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return
    cfg["base_model_name_or_path"] = served_base
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, cfg_path)
