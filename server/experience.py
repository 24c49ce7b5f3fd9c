"""Turns finished requests into experiences: the bridge from the event stream to memory.

A strategy's answer with a clear success signal (1 - uncertainty over a threshold) is
remembered; a clear failure may be kept as a pitfall. Explicit feedback (``POST /v1/feedback``)
scores a recent answer by its response id. Insights are distilled by an upstream call, off the
critical path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from typing import Any

from memory.integrity import MemoryUnavailable
from memory.service import MemoryService
from memory.store import Experience
from protocol.errors import NotFound, ServiceUnavailable, SharpenError
from protocol.events import EventBus, RequestEvent
from protocol.wire import task_of
from server.redact import clip
from server.settings import MemorySettings
from server.upstream import Upstream
from strategies.chat import first_text

log = logging.getLogger(__name__)

_SECTION = re.compile(r"^\s*\**(INSIGHTS|WORKFLOW)\**\s*:?\s*", re.IGNORECASE | re.MULTILINE)


class UpstreamDistiller:
    """CER's distillation: what worked (or failed), and a generalised workflow with placeholders."""

    def __init__(self, upstream: Upstream, model_of: dict[str, str]) -> None:
        self._upstream = upstream
        self._model_of = model_of  # experience uid -> upstream model that answered it

    async def __call__(self, exp: Experience) -> tuple[str, str]:
        verdict = "failed" if exp.kind == "pitfall" else "worked"
        prompt = (f"A task and an answer that {verdict} (score {exp.score:.2f}).\n\nTask:\n{exp.task}\n\nAnswer:\n"
                  f"{exp.answer}\n\nDistil reusable experience in two short sections.\nINSIGHTS: 1-3 bullet points "
                  f"on why the answer {verdict}, useful for similar tasks.\nWORKFLOW: a general step-by-step "
                  "workflow for this kind of task, with placeholders like {x} for the specifics.")
        model = self._model_of.pop(exp.uid, None)
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 256,
                                "temperature": 0.0}
        if model:
            body["model"] = model
        data = await self._upstream.post_json("/chat/completions", body)
        text = first_text(data)
        return parse_distilled(text)


def parse_distilled(text: str) -> tuple[str, str]:
    parts = _SECTION.split(text)
    found = {parts[i].upper(): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    return found.get("INSIGHTS", "")[:1500], found.get("WORKFLOW", "")[:1500]


class ExperienceRecorder:
    """Consumes request events; remembers successes (and pitfalls); serves feedback."""

    def __init__(self, memory: MemoryService, events: EventBus, settings: MemorySettings) -> None:
        self.memory = memory
        self.settings = settings
        self._events = events
        self._queue: asyncio.Queue[RequestEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        # response id -> (tenant, task, answer, model): strings only, so this long-lived map adds
        # nothing for the garbage collector to traverse (whole events here lengthened GC pauses).
        self._recent: OrderedDict[str, tuple[str, str, str, str]] = OrderedDict()
        self.model_of: dict[str, str] = {}

    async def start(self) -> None:
        self._queue = self._events.subscribe()
        self._task = asyncio.create_task(self._consume())

    async def stop(self) -> None:
        if self._queue is not None:
            self._events.unsubscribe(self._queue)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def drain(self) -> None:
        """Waits until every event published so far has been handled (tests)."""
        if self._queue is not None:
            await self._queue.join()

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            ev = await self._queue.get()
            try:
                self._handle(ev)
            except Exception:
                log.exception("recording an experience failed")
            finally:
                self._queue.task_done()

    def _handle(self, ev: RequestEvent) -> None:
        if ev.request_id and ev.answer is not None:
            self._recent[ev.request_id] = (ev.tenant, task_of(ev.messages), ev.answer, ev.model)
            self._recent.move_to_end(ev.request_id)
            while len(self._recent) > self.settings.recent_responses:
                self._recent.popitem(last=False)
        if not ev.remember or ev.uncertainty is None or not ev.answer:
            return
        confidence = 1.0 - ev.uncertainty.score
        if confidence >= self.settings.success_threshold:
            kind = "success"
        elif self.settings.keep_pitfalls and confidence <= self.settings.pitfall_threshold:
            kind = "pitfall"
        else:
            return
        self._remember(ev.tenant, task_of(ev.messages), ev.answer, ev.model, confidence, kind, "strategy")

    def _remember(self, tenant: str, task: str, answer: str, model: str, score: float, kind: str,
                  source: str) -> asyncio.Future[Experience | None]:
        exp = Experience(tenant=tenant, task=task, answer=answer, score=score, kind=kind, source=source)
        fut = self.memory.remember(exp)
        if self.settings.distill:
            self.model_of[exp.uid] = model
            fut.add_done_callback(lambda f: self._forget_model(exp.uid, f))
        return fut

    def _forget_model(self, uid: str, fut: asyncio.Future[Experience | None]) -> None:
        """Only a freshly stored experience is distilled (and pops its model): one that was
        dropped, failed, or merged into an existing row must not leave its entry behind."""
        row = None if fut.cancelled() or fut.exception() is not None else fut.result()
        if row is None or row.uid != uid or row.insights:
            self.model_of.pop(uid, None)

    async def feedback(self, tenant: str, response_id: str, score: float) -> Experience:
        """Stores the answer ``response_id`` with an explicit score; returns once committed."""
        recent = self._recent.get(response_id)
        if recent is None or recent[0] != tenant:  # another tenant's id is as unknown as a missing one
            raise NotFound(f"No recent response with id '{clip(response_id)}'.", param="id",
                           code="response_not_found")
        _, task, answer, model = recent
        kind = "success" if score >= self.settings.success_threshold else "pitfall"
        try:
            row = await self._remember(tenant, task, answer, model, score, kind, "feedback")
        except MemoryUnavailable:
            raise ServiceUnavailable("The experience memory is unavailable on this server; try again later.",
                                     code="memory_unavailable") from None
        if row is None:
            raise SharpenError("The memory write queue is full; try again shortly.")
        return row
