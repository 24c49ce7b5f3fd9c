"""The adaptation loop (consensus self-training: TTRL, arXiv 2504.16084; TT-SI, arXiv 2510.07841).

detect (uncertain requests -> durable queue) -> label (the model's own vote over N samples, clear
majorities only; or, with ``adapt.labeller: best_of_n``, siblings + verified answers) -> train
(LoRA on the agreeing rationales, easy-to-hard, in a separate process) -> gate (pseudo-labelled
held-out split must rise by the margin, the canary must not drop beyond its noise) -> swap (load under
a new immutable name, switch the route atomically, unload the old version once idle) -> roll back
(by hand, or when live confidence falls below the tenant's before the swap). One cycle at a time; every phase is
timed. A failed cycle puts its queries back (up to ``adapt.max_attempts``); the tenant waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from adapt import canary as canarymod
from adapt import consensus
from adapt import data as datamod
from adapt.config import AdaptConfig
from adapt.data import Example
from adapt.gate import evaluate
from adapt.job import Job
from adapt.labeller import Labeller, MajorityVote
from adapt.queue import UncertainQuery, UncertainQueue
from adapt.registry import AdapterRegistry, AdapterVersion, name_base_model
from adapt.rollout import Rollout
from adapt.scope import AdapterScope
from adapt.trainer import LocalProcessTrainer, Trainer, TrainJob
from adapt.watch import LiveWatch
from memory.embedder import Embedder, HashingEmbedder
from protocol.errors import InvalidRequest, NotFound, SharpenError
from protocol.events import EventBus, RequestEvent
from protocol.upstream import AdapterHost, UpstreamAPI
from protocol.wire import task_of

log = logging.getLogger(__name__)


class AdaptationService:
    """Owns the queue, the adapter registry, the jobs and the routes to active adapters."""

    def __init__(self, config: AdaptConfig, directory: Path, upstream: AdapterHost, events: EventBus, *,
                 embedder: Embedder | None = None, trainer: Trainer | None = None,
                 teacher: UpstreamAPI | None = None, labeller: Labeller | None = None) -> None:
        self.config = config
        self.dir = directory.absolute()
        self.upstream = upstream
        self.teacher = teacher
        self.events = events
        self.trainer = trainer or LocalProcessTrainer()
        self.labeller = labeller or MajorityVote.configured(config)
        self.registry = AdapterRegistry(directory / "adapters.sqlite3", shared=config.shared)
        embedder = embedder or HashingEmbedder()
        self.queue = UncertainQueue(directory / "queue.sqlite3", embedder, dedup_similarity=config.dedup_similarity)
        self.scope = AdapterScope(embedder, self.registry, mode=config.scope, threshold=config.scope_similarity,
                                  coverage=config.scope_coverage)
        self.jobs: dict[str, Job] = {}
        self.base: str | None = None  # the upstream's base model name, set at start
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapt")
        self._running: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: asyncio.Queue[RequestEvent] | None = None
        self.rollout = Rollout(upstream, self.registry, LiveWatch(config.rollback_window, config.rollback_drop))
        self._canary = canarymod.CanaryMemo()  # canary answers already known, across cycles
        self._last_cycle = time.monotonic()
        self._cooldown: dict[str, float] = {}  # tenant -> monotonic time before which no cycle starts
        self.on_cycle: Callable[[Job], None] | None = None  # e.g. the metrics; called when a cycle ends

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, base: str | None) -> None:
        self.base = base
        for v in self.registry.restore():
            try:
                await self.rollout.load(v)
                self.registry.activate(v)
            except SharpenError as exc:
                log.warning("could not restore adapter %s: %s", v.name, exc.message)
        self.scope.preload()
        self._sub = self.events.subscribe()
        self._tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._schedule())]

    async def stop(self) -> None:
        if self._sub is not None:
            self.events.unsubscribe(self._sub)
        for t in [*self._tasks, *([self._running] if self._running else [])]:
            t.cancel()
        await asyncio.gather(*self._tasks, *([self._running] if self._running else []), return_exceptions=True)
        await self.rollout.close()
        self._pool.shutdown(wait=False)
        self.scope.close()

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
                u, task = ev.uncertainty, task_of(ev.messages)
                if u is None or u.score < self.config.uncertainty_threshold or not self.opted_in(ev.tenant) or not task:
                    continue
                samples = ev.samples if len(ev.messages) == 1 else None  # samples of the task alone only then
                await loop.run_in_executor(self._pool, self.queue.add, ev.tenant, task, ev.answer or "", u.score,
                                           ev.model, samples)
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
                now = time.monotonic()
                for tenant, n in counts.items():
                    if now < self._cooldown.get(tenant, 0.0):
                        continue
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
        s, loop, version, used = self.config, asyncio.get_running_loop(), None, []
        job.status = "running"
        try:
            canary = canarymod.load(s.canary) if s.canary else None  # refused before any work
            current = self.registry.active(job.tenant, job.base)
            curriculum = examples is None and s.labeller == "consensus"  # labelled data comes easy-to-hard
            if examples is None:
                with job.phase("label", "label" if s.labeller == "consensus" else "synthesize"):
                    pending = await loop.run_in_executor(self._pool, self.queue.pending, job.tenant, s.max_queries)
                    if not pending:
                        raise InvalidRequest(f"tenant '{job.tenant}' has no queued uncertain queries to learn from",
                                             code="adaptation_empty_queue")
                    used = [q.id for q in pending]
                    examples, heldout = await self._data(job, pending, current, heldout)
            if heldout is None:
                examples, heldout = datamod.split(examples, s.holdout_fraction)
            job.examples, job.heldout = len(examples), len(heldout)
            if not examples or not heldout:
                raise InvalidRequest(f"not enough verified examples to train and gate ({len(examples)} train, "
                                     f"{len(heldout)} held out)")
            with job.phase("train"):
                version, jdir = await self._train(job, examples, heldout, current, curriculum)
            if version is None:
                return
            with job.phase("gate", "load"):
                name_base_model(Path(version.path), job.base)
                await self.rollout.load(version)
                job.stage = "gate"
                gate = await evaluate(self.upstream, version.name, current or job.base, job.base, heldout,
                                      s.gate_margin, canary=canary, canary_tolerance=s.canary_tolerance,
                                      canary_z=s.canary_z, max_tokens=s.gate_max_tokens, samples=s.gate_samples,
                                      temperature=s.label_temperature, known=self._canary.under(canary or [], s).scores)
            job.record_gate(gate, len(heldout), consensus_labels=s.labeller == "consensus")
            self.registry.update(version.name, score_new=gate.score_new, score_old=gate.score_old)
            (jdir / "gate.json").write_text(json.dumps(gate.items))
            old = None
            if gate.promote:
                with job.phase("swap"):
                    old = self.rollout.promote(version)
                job.status = "succeeded"
            else:
                self.registry.update(version.name, status="rejected", note=gate.reason)
                job.status = "rejected"
                await self.rollout.unload_when_idle(version.name)
            try:  # report-only, after the verdict: the vote chased, under the model the cycle started from
                if canary and s.canary_vote:
                    with job.phase("report"):
                        vote = await self._canary.vote(self.upstream, current or job.base, job.tenant, self.labeller)
                        job.report.setdefault("canary", {}).update(vote)
            finally:
                if old is not None:
                    self.rollout.spawn(self.rollout.unload_when_idle(old))
        except asyncio.CancelledError:
            if job.status in ("succeeded", "rejected"):  # cancelled while reporting: the verdict stands
                raise
            job.status = "cancelled"
            if version is not None:
                self.registry.update(version.name, status="cancelled")
                if job.stage == "gate":  # loaded for the gate: do not leave it in vLLM
                    self.rollout.spawn(self.rollout.unload_when_idle(version.name))
            raise
        except Exception as exc:
            job.status = "failed"
            job.error = exc.message if isinstance(exc, SharpenError) else f"{type(exc).__name__}: {exc}"
            log.warning("adaptation job %s failed: %s", job.id, job.error)
            version = version or (self.registry.get(job.adapter) if job.adapter else None)  # the trainer raised
            if version is not None:
                self.registry.update(version.name, status="failed", note=job.error)
                if job.stage == "gate":
                    self.rollout.spawn(self.rollout.unload_when_idle(version.name))
        finally:
            await self._settle(job, used, version)

    async def _data(self, job: Job, pending: list[UncertainQuery], current: str | None,
                    heldout: list[Example] | None) -> tuple[list[Example], list[Example] | None]:
        s, queries, model = self.config, [(q.id, q.task) for q in pending], current or job.base
        if s.labeller == "best_of_n":
            return await datamod.synthesize(self.upstream, job.base, job.tenant, queries, s,
                                            answerer=self.teacher, answer_model=s.teacher_model), heldout
        priors = {q.id: q.samples for q in pending if q.model == model}  # another model's samples are not its own
        return await consensus.cycle_data(self.upstream, model, job.tenant, queries, self.labeller, s, job.report,
                                          heldout, priors)

    async def _train(self, job: Job, examples: list[Example], heldout: list[Example], current: str | None,
                     curriculum: bool) -> tuple[AdapterVersion | None, Path]:
        """Trains the next version; None (with the job's status set) when the trainer failed."""
        s = self.config
        hyper = datamod.hyperparameters(s, curriculum=curriculum)
        dh = datamod.data_hash(examples)
        version = self.registry.new_version(job.tenant, job.base, self.dir / "adapters", parent=current,
                                            data_hash=dh, hyper=hyper)
        job.adapter = version.name
        jdir = self.dir / "jobs" / job.id
        ex_file = datamod.write_job_files(jdir, examples, heldout)
        start = self.registry.get(current) if current and s.train_from == "current" else None  # or a fresh LoRA
        job.report["trained_from"] = start.name if start else "base"  # the registry's parent: what it replaces
        tj = TrainJob(job_dir=str(jdir), base_model_path=str(s.base_model_path), examples=str(ex_file),
                      out_dir=version.path, data_hash=dh, hyper=hyper, parent_adapter=start.name if start else None,
                      parent_adapter_path=start.path if start else None)
        self._train_job = tj
        outcome = await self.trainer.run(tj)
        job.train = outcome.progress
        if not outcome.ok:
            self.registry.update(version.name, status=outcome.status, note=outcome.error or "")
            job.status = "cancelled" if outcome.status == "cancelled" else "failed"
            job.error = outcome.error or f"the trainer ended with status {outcome.status}"
            return None, jdir
        if s.scope == "near":  # what it learnt from is what it will answer (adapt/scope.py)
            job.report["scope"] = await self.scope.save(version.path, [e.task for e in examples + heldout], start)
        return version, jdir

    async def _settle(self, job: Job, used: list[int], version: AdapterVersion | None) -> None:
        """Ends the job: queries spent or put back, the figures recorded and handed to ``on_cycle``."""
        loop, job.report["phases_s"] = asyncio.get_running_loop(), dict(job.phases_s)
        if job.status in ("failed", "cancelled"):  # put back, not lost; the tenant waits (failing ones set aside)
            self._cooldown[job.tenant] = time.monotonic() + self.config.retry_after_s
            if used:
                with contextlib.suppress(Exception):
                    back = await loop.run_in_executor(self._pool, self.queue.release, used, self.config.max_attempts)
                    job.report["queue"] = {"returned": back, "set_aside": len(used) - back}
        elif used:  # a verdict was reached: spent
            with contextlib.suppress(Exception):
                await loop.run_in_executor(self._pool, self.queue.mark_used, used)
        with contextlib.suppress(Exception):
            if version is not None:
                self.registry.update(version.name, report=job.report)
        job.stage = "done"
        job.finished = time.time()
        try:
            if self.on_cycle is not None:
                self.on_cycle(job)
        except Exception:
            log.exception("reporting the cycle failed")

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

    # -- swap and roll back (adapt/rollout.py) -----------------------------------------------

    @property
    def models_changed(self) -> Callable[[], Awaitable[None]] | None:
        """Called when the upstream's adapters change, so the proxy's model list follows at once."""
        return self.rollout.models_changed

    @models_changed.setter
    def models_changed(self, fn: Callable[[], Awaitable[None]] | None) -> None:
        self.rollout.models_changed = fn

    async def rollback(self, tenant: str, reason: str = "by hand") -> dict[str, Any]:
        """Routes back to the previous version (or the base) and unloads the current one."""
        return await self.rollout.rollback(tenant, self.base or "", reason)

    def _watch_live(self, ev: RequestEvent) -> None:
        """Automatic roll back: live confidence on a new adapter well below its tenant's before the swap."""
        reason = self.rollout.watch.observe(ev.tenant, ev.model, 1.0 - ev.uncertainty.score) if ev.uncertainty else None
        if reason and (v := self.registry.get(ev.model)) is not None:
            self.rollout.spawn(self.rollback(v.tenant, reason=reason))

    def visible(self, tenant: str, model: str) -> bool:  # routing: called by the proxy on every request
        return self.registry.visible(tenant, model)

    def acquire(self, tenant: str, model: str) -> str:
        return self.registry.acquire(tenant, model)

    def release(self, name: str) -> None:
        self.registry.release(name)

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "base": self.base, "tenants": self.config.tenants,
                "queue": self.queue.counts(), "running": self._running is not None and not self._running.done(),
                "jobs": len(self.jobs)}

