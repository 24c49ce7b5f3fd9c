"""Shared fixtures of the adaptation tests: a fake trainer, held-out and training examples, the
fake's gate script, and ``make`` (an AdaptationService on the fake upstream, stopped after the test)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapt.config import AdaptConfig
from adapt.data import Example
from adapt.service import AdaptationService, Job
from adapt.trainer import Trainer, TrainJob, TrainOutcome
from protocol.events import EventBus, RequestEvent, Sample
from protocol.uncertainty import Uncertainty
from server.settings import UpstreamSettings
from server.upstream import Upstream
from tests.fakes.upstream import FakeUpstream

BASE = "fake"


# ---- fakes and helpers ------------------------------------------------------------------------


class FakeTrainer(Trainer):
    """Writes an adapter folder and succeeds, or fails, or raises; ``hold`` keeps it "training"
    until released (a threading.Event, so a test thread can release a proxy's trainer)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode  # ok | fail | crash
        self.jobs: list[TrainJob] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.cancelled: list[str] = []

    def hold(self) -> FakeTrainer:
        self.release.clear()
        return self

    async def run(self, job: TrainJob) -> TrainOutcome:
        self.jobs.append(job)
        self.started.set()
        while not self.release.is_set():  # noqa: ASYNC110 - a threading.Event: a test thread may set it
            await asyncio.sleep(0.01)
        if job.job_dir in self.cancelled:
            return TrainOutcome(False, "cancelled", progress={"status": "cancelled"})
        if self.mode == "crash":
            raise RuntimeError("the trainer exploded")
        if self.mode == "fail":
            return TrainOutcome(False, "failed", error="out of memory", progress={"status": "failed"})
        await asyncio.to_thread(self._write_adapter, job)
        return TrainOutcome(True, "done", adapter_path=job.out_dir,
                            progress={"status": "done", "step": 3, "total_steps": 3, "loss": 0.5})

    @staticmethod
    def _write_adapter(job: TrainJob) -> None:
        out = Path(job.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps({"r": job.hyper.get("rank")}))

    def progress(self, job: TrainJob) -> dict[str, Any]:
        return {"status": "training", "step": 1, "total_steps": 3, "loss": 1.25}

    async def cancel(self, job: TrainJob) -> None:
        self.cancelled.append(job.job_dir)
        self.release.set()


def heldout(n: int = 4) -> list[Example]:
    return [Example(task=f"Held-out zorblat question {k}?", answer="The answer is 7.", reference="7")
            for k in range(n)]


def train_examples(n: int = 4) -> list[Example]:
    return [Example(task=f"Zorblat question {k}?", answer="The answer is 7.") for k in range(n)]


class GateScript:
    """The fake's answers: model ``m`` gets the first ``right[m]`` held-out questions right."""

    def __init__(self, **right: int) -> None:
        self.right: dict[str, int] = dict(right)

    def __call__(self, body: dict[str, Any], i: int) -> str:
        text = str(body["messages"][-1]["content"])
        m = re.search(r"question (\d+)", text)
        k = int(m.group(1)) if m else 0
        return "The answer is 7." if k < self.right.get(body["model"], 0) else "The answer is 3."


async def until(pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)


async def done(job: Job, timeout: float = 10.0) -> Job:
    await until(lambda: job.finished is not None, timeout)
    return job


def event(tenant: str, task: str, u: float | None, model: str = BASE, *, samples: list[Sample] | None = None,
          system: bool = True) -> RequestEvent:
    """A finished request; with ``system`` False the user's task was the only message sent."""
    messages = [{"role": "system", "content": "be brief"}] if system else []
    return RequestEvent(request_id="r", tenant=tenant, model=model, strategy="self_consistency",
                        messages=[*messages, {"role": "user", "content": task}], answer="an answer",
                        uncertainty=None if u is None else Uncertainty(score=u), usage={}, samples=samples or [])


Make = Callable[..., Awaitable[AdaptationService]]


@pytest.fixture
async def make(fake_upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[Make]:
    """An AdaptationService on the fake (started: base model ``fake``), with the given trainer
    and settings; every one made is stopped after the test."""
    made: list[tuple[AdaptationService, Upstream]] = []

    async def factory(trainer: Trainer | None = None, *, directory: Path | None = None, start: bool = True,
                      upstream_url: str | None = None, **settings: Any) -> AdaptationService:
        # the gate's greedy answers alone unless a test asks for samples: the scripts here answer
        # by model, and the sampled scoring has its own tests (test_gate.py, test_cycle.py)
        values = {"enabled": True, "tenants": ["a"], "base_model_path": str(tmp_path), "gate_margin": 0.1,
                  "gate_samples": 0, **settings}
        up = Upstream(upstream_url or fake_upstream.url, UpstreamSettings())
        svc = AdaptationService(AdaptConfig(**values), directory or tmp_path / "adapt", up, EventBus(),
                                trainer=trainer or FakeTrainer())
        made.append((svc, up))
        if start:
            await svc.start(BASE)
        return svc

    yield factory
    for svc, up in made:
        await svc.stop()
        svc.registry.close()
        svc.queue.close()
        await up.aclose()


async def promote(svc: AdaptationService, fake: FakeUpstream, tenant: str = "a", right: int = 4) -> str:
    """Runs a cycle whose adapter the gate promotes; returns its name."""
    name = f"{BASE}-{tenant}-v{len(svc.registry.versions(tenant)) + 1}"
    script = fake._script if isinstance(fake._script, GateScript) else GateScript()
    script.right[name] = right
    fake.script(script)
    job = await done(svc.run_cycle(tenant, examples=train_examples(), heldout=heldout()))
    assert job.status == "succeeded", job.public()
    assert job.adapter == name
    return name
