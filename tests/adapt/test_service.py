"""The adaptation loop against the fake upstream (which loads and unloads adapters with vLLM's
semantics), with a fake trainer: detection, scheduling, one cycle at a time, failures, the gate,
promotion with idle unload, manual and automatic rollback, tenant scoping, restore at start."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import adapt.service
from adapt.data import Example
from adapt.trainer import LocalProcessTrainer, Trainer, TrainJob
from protocol.errors import InvalidRequest, NotFound
from protocol.events import Sample
from tests.adapt.conftest import (
    BASE,
    FakeTrainer,
    GateScript,
    Make,
    done,
    event,
    heldout,
    promote,
    train_examples,
    until,
)
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(60)

# ---- detect -----------------------------------------------------------------------------------


async def test_uncertain_events_are_queued_for_opted_in_tenants_above_threshold(make: Make) -> None:
    svc = await make(tenants=["a", "c"], uncertainty_threshold=0.5)
    bus = svc.events
    bus.publish(event("a", "What is the zorblat of cat?", 0.8))
    bus.publish(event("a", "A confident question about owls?", 0.2))  # below the threshold
    bus.publish(event("a", "A question with no uncertainty measured?", None))  # passthrough
    bus.publish(event("b", "Tenant b did not opt in, did it?", 0.9))
    bus.publish(event("a", "What is the zorblat of cat?", 0.9))  # a duplicate
    bus.publish(event("c", "Exactly at the threshold, queued?", 0.5))
    await until(lambda: svc.queue.counts().get("c") == 1)
    assert svc.queue.counts() == {"a": 1, "c": 1}
    [q] = svc.queue.pending("a")
    assert (q.task, q.answer, q.uncertainty, q.model) == ("What is the zorblat of cat?", "an answer", 0.8, BASE)
    assert svc.status()["queue"] == {"a": 1, "c": 1}


async def test_a_question_in_content_parts_is_queued_as_its_text(make: Make) -> None:
    """The queued task is the text the adapter's scope routes by (protocol.wire.task_of), not a
    Python list repr the adapter would then be trained on."""
    svc = await make(uncertainty_threshold=0.5)
    ev = event("a", "", 0.9)
    ev.messages[-1]["content"] = [{"type": "text", "text": "How many r's in"}, {"type": "text", "text": "strawberry?"}]
    svc.events.publish(ev)
    await until(lambda: svc.queue.counts().get("a") == 1)
    assert svc.queue.pending("a")[0].task == "How many r's in strawberry?"


async def test_a_queued_query_keeps_its_live_samples_only_when_the_task_was_all_that_was_sent(make: Make) -> None:
    """The candidates a request drew are samples of the task alone only without a system
    prompt (or recalled memory) before it; otherwise labelling must draw its own."""
    svc = await make(tenants=["*"])
    drawn = [Sample("So 7. The answer is 7.", "7", "stop", -0.1), Sample("print(9)", "9", "stop", -0.4, program=True)]
    svc.events.publish(event("a", "What is the zorblat of cat?", 0.8, samples=drawn, system=False))
    svc.events.publish(event("b", "What is the zorblat of cat?", 0.8, samples=drawn))
    await until(lambda: svc.queue.counts() == {"a": 1, "b": 1})
    assert svc.queue.pending("a")[0].samples == drawn
    assert svc.queue.pending("b")[0].samples == []


async def test_labelling_draws_only_what_the_live_request_did_not(make: Make, fake_upstream: FakeUpstream) -> None:
    """A queued query with 3 live samples of the labelling model draws 1 more for label_n=4; one
    served by another model (an older adapter) draws all 4: its samples are not this model's."""
    fake_upstream.script(lambda body, i: "So it is 7. The answer is 7.")
    svc = await make(label_n=4, label_pal=0)
    mine = [Sample(f"Step {i}. The answer is 7.", "7", "stop", -0.1) for i in range(3)]
    svc.events.publish(event("a", "What is the zorblat of cat?", 0.9, samples=mine, system=False))
    svc.events.publish(event("a", "What is the zorblat of a yak?", 0.8, "fake-a-v0", samples=mine, system=False))
    await until(lambda: svc.queue.counts() == {"a": 2})
    job = await done(svc.run_cycle("a"))
    labelling = [c.json for c in fake_upstream.completion_calls() if c.json.get("temperature") != 0.0]
    assert sorted((c["messages"][-1]["content"], c["n"]) for c in labelling) == [
        ("What is the zorblat of a yak?", 4), ("What is the zorblat of cat?", 1)]
    assert job.report["labelling"]["reused_samples"] == 3


async def test_every_tenant_with_a_star(make: Make) -> None:
    svc = await make(tenants=["*"])
    assert svc.opted_in("anyone") and svc.opted_in("a")
    svc.events.publish(event("zed", "Some hard question for zed?", 0.9))
    await until(lambda: svc.queue.counts() == {"zed": 1})


# ---- scheduling and one cycle at a time ------------------------------------------------------


class _FastAsyncio:
    """``asyncio`` for adapt.service with the scheduler's 5 s tick cut to 20 ms."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return await asyncio.sleep(min(delay, 0.02), result)


def synth_script(body: dict[str, Any], i: int) -> str:
    text = str(body["messages"][-1]["content"])
    if "new questions of the same kind" in text:
        return "What is the zorblat of owl?\nWhat is the zorblat of eel?\nWhat is the zorblat of yak?"
    if "Verification task:" in text:
        return "FINAL VERIFICATION ANSWER: True"
    return "The answer is 7."  # every model, adapters included: the gate sees no gain


async def test_queue_size_triggers_one_cycle_at_a_time(make: Make, fake_upstream: FakeUpstream,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapt.service, "asyncio", _FastAsyncio())
    fake_upstream.script(synth_script)
    trainer = FakeTrainer().hold()
    svc = await make(trainer, tenants=["a", "b"], queue_trigger=2, siblings=3, bon_n=2,
                     labeller="best_of_n")
    for t in ("a", "b"):
        svc.queue.add(t, f"What is the zorblat of cat for {t}?", "", 0.9, BASE)
        svc.queue.add(t, f"What is the zorblat of a dog, said tenant {t}?", "", 0.9, BASE)
    await until(lambda: svc.jobs)
    await until(trainer.started.is_set)
    await asyncio.sleep(0.3)  # many scheduler ticks while the cycle trains
    assert len(svc.jobs) == 1
    [first] = svc.jobs.values()
    assert first.tenant == "a" and first.status == "running" and first.stage == "train"
    assert first.examples + first.heldout == 8  # 2 queries x (itself + 3 siblings), all approved
    with pytest.raises(InvalidRequest) as busy:
        svc.run_cycle("b")
    assert busy.value.code == "adaptation_busy"
    trainer.release.set()
    await done(first)
    assert first.status == "rejected"  # adapters answer no better than the base
    # then tenant b's turn; once both queues are spent no further cycle starts, even though
    # neither was promoted (the same queries again would only give the same result)
    await until(lambda: len(svc.jobs) == 2)
    second = next(j for j in svc.jobs.values() if j is not first)
    assert second.tenant == "b"
    await done(second)
    await asyncio.sleep(0.3)
    assert len(svc.jobs) == 2, [j.public() for j in svc.jobs.values()]
    assert svc.queue.counts() == {}


async def test_failed_cycles_do_not_retry_the_same_queue_forever(make: Make, fake_upstream: FakeUpstream,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapt.service, "asyncio", _FastAsyncio())
    fake_upstream.script(synth_script)
    svc = await make(FakeTrainer("crash"), queue_trigger=1, siblings=3, bon_n=2)
    svc.queue.add("a", "What is the zorblat of cat?", "", 0.9, BASE)
    await until(lambda: svc.jobs)
    await done(next(iter(svc.jobs.values())))
    await asyncio.sleep(0.3)
    assert [j.status for j in svc.jobs.values()] == ["failed"]


async def test_period_triggers_a_cycle_below_the_queue_size(make: Make, fake_upstream: FakeUpstream,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapt.service, "asyncio", _FastAsyncio())
    fake_upstream.script(synth_script)
    svc = await make(queue_trigger=100, period_s=0.0, siblings=3, bon_n=2)
    await asyncio.sleep(0.1)
    assert not svc.jobs  # nothing queued: nothing to do, period or not
    svc.queue.add("a", "What is the zorblat of cat?", "", 0.9, BASE)
    await until(lambda: svc.jobs)


async def test_second_run_cycle_while_one_runs_is_busy(make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript())
    trainer = FakeTrainer().hold()
    svc = await make(trainer)
    job = svc.run_cycle("a", examples=train_examples(), heldout=heldout())
    await until(trainer.started.is_set)
    with pytest.raises(InvalidRequest) as busy:
        svc.run_cycle("b", examples=train_examples(), heldout=heldout())
    assert busy.value.code == "adaptation_busy"
    assert svc.status()["running"] is True and len(svc.jobs) == 1
    trainer.release.set()
    await done(job)
    again = await done(svc.run_cycle("a", examples=train_examples(), heldout=heldout()))
    assert again.finished is not None and svc.status()["running"] is False


async def test_run_cycle_needs_the_base_weights_and_the_base_name(make: Make) -> None:
    svc = await make(base_model_path=None)
    with pytest.raises(InvalidRequest) as e:
        svc.run_cycle("a")
    assert e.value.code == "adaptation_unavailable"
    svc = await make(start=False, directory=Path(svc.dir.parent / "other"))
    with pytest.raises(InvalidRequest) as e:
        svc.run_cycle("a")
    assert e.value.code == "adaptation_unavailable"


async def test_too_few_examples_fail_the_job(make: Make, fake_upstream: FakeUpstream) -> None:
    svc = await make()
    job = await done(svc.run_cycle("a", examples=train_examples(1)))  # nothing left to hold out
    assert job.status == "failed" and "not enough verified examples" in (job.error or "")
    assert svc.registry.versions() == []


# ---- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "error"),
                         [("fail", "out of memory"), ("crash", "RuntimeError: the trainer exploded")])
async def test_trainer_failure_marks_the_job_failed(make: Make, fake_upstream: FakeUpstream, mode: str,
                                                    error: str) -> None:
    fake_upstream.script(GateScript(**{"fake-a-v1": 4}))
    svc = await make(FakeTrainer(mode))
    job = await done(svc.run_cycle("a", examples=train_examples(), heldout=heldout()))
    assert job.status == "failed" and job.error == error and job.stage == "done"
    [v] = svc.registry.versions("a")
    assert v.status == "failed" and v.name == job.adapter and error in v.note
    assert fake_upstream.adapters == {}  # nothing was loaded
    assert svc.acquire("a", BASE) == BASE
    # the job's files are there for a post-mortem
    jdir = svc.dir / "jobs" / job.id
    assert len((jdir / "train.jsonl").read_text().splitlines()) == 4
    assert len((jdir / "heldout.jsonl").read_text().splitlines()) == 4
    # and the next cycle works, under a new name
    svc.trainer = FakeTrainer()
    fake_upstream.script(GateScript(**{"fake-a-v2": 4}))
    nxt = await done(svc.run_cycle("a", examples=train_examples(), heldout=heldout()))
    assert nxt.status == "succeeded" and nxt.adapter == "fake-a-v2"


async def test_load_failure_marks_the_job_failed(make: Make, fake_upstream: FakeUpstream) -> None:
    svc = await make()
    fake_upstream.fault, fake_upstream.fault_scope = "500", "all"
    try:
        job = await done(svc.run_cycle("a", examples=train_examples(), heldout=heldout()))
    finally:
        fake_upstream.fault, fake_upstream.fault_scope = "none", "completions"
    assert job.status == "failed" and job.error
    assert svc.registry.get(job.adapter or "").status == "failed"  # type: ignore[union-attr]


async def test_cancel_while_training(make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript())
    trainer = FakeTrainer().hold()
    svc = await make(trainer)
    job = svc.run_cycle("a", examples=train_examples(), heldout=heldout())
    await until(trainer.started.is_set)
    assert svc.progress(job)["train"] == {"status": "training", "step": 1, "total_steps": 3, "loss": 1.25}
    await svc.cancel(job.id)
    await done(job)
    assert job.status == "cancelled"
    assert svc.registry.get(job.adapter or "").status == "cancelled"  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        await svc.cancel("nope")


async def test_cancel_during_the_gate_unloads_the_candidate(make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript())
    fake_upstream.ttft = 30.0  # the gate's requests hang
    svc = await make()
    job = svc.run_cycle("a", examples=train_examples(), heldout=heldout())
    await until(lambda: job.stage == "gate" and fake_upstream.in_flight > 0)
    assert "fake-a-v1" in fake_upstream.adapters
    await svc.cancel(job.id)
    await done(job)
    assert job.status == "cancelled"
    assert svc.registry.get("fake-a-v1").status == "cancelled"  # type: ignore[union-attr]
    await until(lambda: "fake-a-v1" not in fake_upstream.adapters)
    assert svc.acquire("a", BASE) == BASE


async def test_scheduler_survives_a_cycle_that_cannot_start(make: Make, fake_upstream: FakeUpstream,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(adapt.service, "asyncio", _FastAsyncio())
    fake_upstream.script(synth_script)
    svc = await make(queue_trigger=1, base_model_path=None, siblings=3, bon_n=2)
    svc.queue.add("a", "What is the zorblat of cat?", "", 0.9, BASE)
    await until(lambda: "could not start an adaptation cycle" in caplog.text)
    assert not svc.jobs
    svc.config.base_model_path = str(svc.dir)  # configured now: the next tick starts it
    await until(lambda: svc.jobs)


async def test_cancelling_a_finished_job_leaves_the_running_one_alone(make: Make,
                                                                      fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript())
    svc = await make(FakeTrainer("fail"))
    old = await done(svc.run_cycle("a", examples=train_examples(), heldout=heldout()))
    trainer = FakeTrainer().hold()
    svc.trainer = trainer
    job = svc.run_cycle("a", examples=train_examples(), heldout=heldout())
    await until(trainer.started.is_set)
    await svc.cancel(old.id)
    await asyncio.sleep(0.1)
    assert job.status == "running" and old.status == "failed"
    trainer.release.set()
    await done(job)
    assert job.status == "rejected"


# ---- gate, promotion, rollback ----------------------------------------------------------------


async def test_gate_rejects_and_unloads_the_candidate(make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript(**{BASE: 2, "fake-a-v1": 2}))  # no better than the base
    svc = await make()
    job = await done(svc.run_cycle("a", examples=train_examples(), heldout=heldout()))
    assert job.status == "rejected" and (job.score_new, job.score_old) == (0.5, 0.5)
    v = svc.registry.get("fake-a-v1")
    assert v is not None and v.status == "rejected" and (v.score_new, v.score_old) == (0.5, 0.5)
    assert "0.500 < 0.500 + 0.1" in v.note
    assert fake_upstream.adapters == {}  # it was loaded for the gate, then unloaded
    assert svc.acquire("a", BASE) == BASE  # and never routed
    gate = json.loads((svc.dir / "jobs" / job.id / "gate.json").read_text())
    assert [(g["new"], g["old"], g["reference"]) for g in gate] == [(1.0, 1.0, "7")] * 2 + [(0.0, 0.0, "7")] * 2
    # the gate asked both models greedily, on the held-out questions only
    gate_calls = [c.json for c in fake_upstream.completion_calls()]
    assert {c["model"] for c in gate_calls} == {BASE, "fake-a-v1"}
    assert all(c["temperature"] == 0.0 for c in gate_calls)
    assert {c["messages"][0]["content"] for c in gate_calls} == {e.task for e in heldout()}


async def test_promotion_switches_the_route_and_unloads_the_old_version_once_idle(
        make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript())
    svc = await make()
    v1 = await promote(svc, fake_upstream, right=2)
    assert svc.acquire("a", BASE) == v1  # routed...
    assert fake_upstream.adapters[v1].endswith(v1) and Path(fake_upstream.adapters[v1]).is_absolute()
    assert svc.registry.get(v1).status == "active"  # type: ignore[union-attr]
    # ...and that request is still in flight when v2 is promoted over v1
    v2 = await promote(svc, fake_upstream, right=4)
    assert svc.registry.get(v2).parent == v1  # type: ignore[union-attr]
    assert svc.registry.get(v1).status == "retired"  # type: ignore[union-attr]
    assert svc.acquire("a", BASE) == v2  # new requests go to v2 at once
    await asyncio.sleep(0.2)
    assert v1 in fake_upstream.adapters  # the old one stays loaded while its request runs
    svc.release(v1)
    await until(lambda: v1 not in fake_upstream.adapters)
    assert v2 in fake_upstream.adapters
    svc.release(v2)
    listed = {v.name: v for v in svc.registry.versions("a")}
    assert (listed[v2].score_new, listed[v2].score_old) == (1.0, 0.5)  # gated against v1, not the base


@pytest.mark.parametrize("train_from", ["base", "current"])
async def test_train_from_decides_whether_the_next_adapter_starts_from_the_active_one(
        make: Make, fake_upstream: FakeUpstream, train_from: str) -> None:
    trainer = FakeTrainer()
    svc = await make(trainer, train_from=train_from)
    v1 = await promote(svc, fake_upstream, right=2)
    v2 = await promote(svc, fake_upstream, right=4)
    first, second = trainer.jobs
    assert first.parent_adapter is None and first.parent_adapter_path is None  # nothing active yet: the base
    if train_from == "current":  # the weights start from v1's folder; lineage and report say so
        assert (second.parent_adapter, second.parent_adapter_path) == (v1, svc.registry.get(v1).path)  # type: ignore[union-attr]
    else:
        assert second.parent_adapter is None and second.parent_adapter_path is None
    report = svc.registry.get(v2).report  # type: ignore[union-attr]
    assert report["trained_from"] == (v1 if train_from == "current" else "base")
    assert svc.registry.get(v2).parent == v1  # type: ignore[union-attr]  # what it replaced, either way


async def test_manual_rollback_restores_the_parent_then_the_base(make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript())
    svc = await make()
    v1 = await promote(svc, fake_upstream, right=2)
    v2 = await promote(svc, fake_upstream, right=4)
    await until(lambda: v1 not in fake_upstream.adapters)
    held = svc.acquire("a", BASE)
    assert held == v2

    out = await svc.rollback("a")
    assert out == {"rolled_back": v2, "now": v1, "reason": "by hand"}
    assert svc.acquire("a", BASE) == v1
    assert v1 in fake_upstream.adapters  # loaded again before the route switched back
    assert svc.registry.get(v1).status == "active"  # type: ignore[union-attr]
    assert svc.registry.get(v2).status == "rolled_back"  # type: ignore[union-attr]
    await asyncio.sleep(0.1)
    assert v2 in fake_upstream.adapters  # in flight still
    svc.release(held)
    await until(lambda: v2 not in fake_upstream.adapters)

    out = await svc.rollback("a", reason="bad answers")
    assert out == {"rolled_back": v1, "now": BASE, "reason": "bad answers"}
    svc.release(v1)
    assert svc.acquire("a", BASE) == BASE
    await until(lambda: v1 not in fake_upstream.adapters)
    assert svc.registry.get(v1).note == "bad answers"  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        await svc.rollback("a")
    # a later cycle trains v3 against the base, with no parent
    v3 = await promote(svc, fake_upstream, right=1)
    assert v3 == "fake-a-v3" and svc.registry.get(v3).parent is None  # type: ignore[union-attr]


async def test_automatic_rollback_when_live_confidence_drops(make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript())
    svc = await make(rollback_window=3, rollback_drop=0.15, uncertainty_threshold=2.0)  # queue nothing

    def status(name: str) -> str:
        v = svc.registry.get(name)
        assert v is not None
        return v.status

    # no traffic before the swap: the baseline is the gate's score, 1.0; roll back below 0.85 live
    v1 = await promote(svc, fake_upstream, right=4)
    svc.events.publish(event("a", "q", 0.9, model=v1))
    svc.events.publish(event("a", "q", 0.9, model=v1))  # two unsure answers: the window is not full yet
    for _ in range(5):
        svc.events.publish(event("a", "q", 0.95, model=BASE))  # the base model's do not count for v1
    await asyncio.sleep(0.2)
    assert status(v1) == "active" and svc.registry.active("a", BASE) == v1
    svc.events.publish(event("a", "q", 0.05, model=v1))  # full: (0.1 + 0.1 + 0.95) / 3 = 0.383
    await until(lambda: status(v1) == "rolled_back")
    assert "live confidence 0.383 < 1.000 (gate) - 0.15" in svc.registry.get(v1).note  # type: ignore[union-attr]
    assert svc.acquire("a", BASE) == BASE
    svc.release(BASE)
    await until(lambda: v1 not in fake_upstream.adapters)

    # the tenant's last 3 answers before this swap, under the base, were 0.95, 0.95, 0.95: that is
    # v2's baseline now (the same measure, not the gate's)
    for _ in range(3):
        svc.events.publish(event("a", "q", 0.05, model=BASE))
    await asyncio.sleep(0.1)
    v2 = await promote(svc, fake_upstream, right=4)
    assert svc.registry.get(v2).parent is None  # type: ignore[union-attr]
    for u in (0.05, 0.05, 0.05, 0.2):  # live 0.95, then 0.9: well enough
        svc.events.publish(event("a", "q", u, model=v2))
    await asyncio.sleep(0.2)
    assert status(v2) == "active"
    svc.events.publish(event("a", "q", 0.9, model=v2))  # (0.95 + 0.8 + 0.1) / 3 = 0.617
    await until(lambda: status(v2) == "rolled_back")
    assert "live confidence 0.617 < 0.950 (before the swap)" in svc.registry.get(v2).note  # type: ignore[union-attr]
    assert svc.registry.active("a", BASE) is None


async def test_automatic_rollback_compares_with_the_tenants_confidence_before_the_swap(
        make: Make, fake_upstream: FakeUpstream) -> None:
    # a hard tenant: the base answered it at confidence 0.4. The adapter's gate score is 1.0, and
    # live at 0.5 it is surer than the base was: compared with the gate (the rule before) it would
    # be rolled back at once; compared with the tenant's own traffic it stays
    svc = await make(rollback_window=3, rollback_drop=0.15, uncertainty_threshold=2.0)
    for _ in range(3):
        svc.events.publish(event("a", "q", 0.6, model=BASE))
    await asyncio.sleep(0.1)
    v1 = await promote(svc, fake_upstream, right=4)
    for _ in range(4):
        svc.events.publish(event("a", "q", 0.5, model=v1))
    await asyncio.sleep(0.2)
    assert svc.registry.get(v1).status == "active"  # type: ignore[union-attr]
    for _ in range(3):  # 0.2 live: 0.15 below the base's 0.4 and more
        svc.events.publish(event("a", "q", 0.8, model=v1))
    await until(lambda: svc.registry.get(v1).status == "rolled_back")  # type: ignore[union-attr]
    assert "live confidence 0.200 < 0.400 (before the swap) - 0.15" in svc.registry.get(v1).note  # type: ignore[union-attr]


async def test_adapters_serve_their_tenant_only_unless_shared(make: Make, fake_upstream: FakeUpstream,
                                                              tmp_path: Path) -> None:
    fake_upstream.script(GateScript())
    svc = await make(tenants=["a", "b"])
    v1 = await promote(svc, fake_upstream, "a")
    assert svc.acquire("a", BASE) == v1
    assert svc.acquire("b", BASE) == BASE
    assert svc.acquire("a", "another-base") == "another-base"
    await svc.stop()

    shared = await make(directory=tmp_path / "shared", tenants=["a"], shared=True)
    name = await promote(shared, fake_upstream, "a")
    assert shared.acquire("a", BASE) == name and shared.acquire("b", BASE) == name
    await shared.rollback("b")  # one shared route: any tenant's rollback is everyone's
    assert shared.acquire("a", BASE) == BASE


async def test_active_adapters_are_restored_at_start(make: Make, fake_upstream: FakeUpstream,
                                                     tmp_path: Path) -> None:
    fake_upstream.script(GateScript())
    svc = await make(tenants=["a", "b"])
    va = await promote(svc, fake_upstream, "a")
    vb = await promote(svc, fake_upstream, "b")
    await svc.rollback("b")
    await svc.stop()
    with FakeUpstream() as fresh:  # a restarted vLLM: nothing loaded
        again = await make(directory=svc.dir, upstream_url=fresh.url, tenants=["a", "b"])
        assert set(fresh.adapters) == {va}
        assert again.acquire("a", BASE) == va and again.acquire("b", BASE) == BASE
        assert again.registry.get(vb).status == "rolled_back"  # type: ignore[union-attr]
        await again.stop()
    # the same vLLM still has it: "already loaded" is no error
    assert va in fake_upstream.adapters
    third = await make(directory=svc.dir, tenants=["a"])
    assert third.acquire("a", BASE) == va


# ---- the local-process trainer ----------------------------------------------------------------

_WORKER = r"""
import json, os, sys, time
from pathlib import Path
job = json.loads(Path(sys.argv[1]).read_text())
d = Path(job["job_dir"])
mode = job["hyper"]["mode"]
def progress(**kw): (d / "progress.json").write_text(json.dumps(kw))
if mode == "ok":
    Path(job["out_dir"]).mkdir(parents=True)
    progress(status="done", step=2, total_steps=2, threads=os.environ["OMP_NUM_THREADS"])
    sys.exit(0)
if mode == "fail":
    progress(status="failed", error="ValueError: no training examples")
    sys.exit(1)
if mode == "die":
    print("segfault-ish", flush=True)
    sys.exit(3)
while not (d / "cancel").exists():
    progress(status="training", step=1, total_steps=9)
    time.sleep(0.02)
progress(status="cancelled")
sys.exit(2)
"""


class ScriptTrainer(LocalProcessTrainer):
    def command(self, job_file: Path) -> list[str]:
        return [sys.executable, "-c", _WORKER, str(job_file)]


def tjob(tmp_path: Path, mode: str) -> TrainJob:
    return TrainJob(job_dir=str(tmp_path / mode), base_model_path="/nowhere", examples="/nowhere/x.jsonl",
                    out_dir=str(tmp_path / mode / "adapter"), data_hash="h", hyper={"mode": mode, "threads": 1})


async def test_local_process_trainer_outcomes(tmp_path: Path) -> None:
    t = ScriptTrainer()
    ok = await t.run(tjob(tmp_path, "ok"))
    assert ok.ok and ok.status == "done" and ok.adapter_path == str(tmp_path / "ok" / "adapter")
    assert ok.progress["threads"] == "1"  # the thread cap reaches the child
    assert json.loads((tmp_path / "ok" / "job.json").read_text())["hyper"]["mode"] == "ok"

    fail = await t.run(tjob(tmp_path, "fail"))
    assert (fail.ok, fail.status, fail.error) == (False, "failed", "ValueError: no training examples")

    die = await t.run(tjob(tmp_path, "die"))
    assert (die.ok, die.status, die.error) == (False, "failed", "the trainer exited with status 3")
    assert "segfault-ish" in (tmp_path / "die" / "train.log").read_text()


async def test_local_process_trainer_cancel(tmp_path: Path) -> None:
    t = ScriptTrainer(grace_s=5)
    job = tjob(tmp_path, "wait")
    run = asyncio.create_task(t.run(job))
    await until(lambda: t.progress(job).get("status") == "training")
    assert t.progress(job)["total_steps"] == 9
    await t.cancel(job)
    out = await asyncio.wait_for(run, 10)
    assert (out.ok, out.status) == (False, "cancelled")
    assert t.progress(tjob(tmp_path, "never-ran")) == {}


# ---- through the proxy ------------------------------------------------------------------------

ADMIN = {"authorization": "Bearer adm"}
KEYS = {"ka": "tenant-a", "kb": "tenant-b"}


def proxy_with(make_proxy: Callable[..., ProxyServer], fake: FakeUpstream, tmp_path: Path, trainer: Trainer,
               **adapt_settings: Any) -> ProxyServer:
    p = make_proxy(fake.url, data_dir=str(tmp_path / "data"), admin_key="adm", api_keys=KEYS,
                   adapt={"enabled": True, "tenants": ["*"], "base_model_path": str(tmp_path), "gate_margin": 0.1,
                          **adapt_settings},
                   memory={"embedder": "hashing", "distill": False})
    svc = p.app.services.adapt
    assert svc is not None
    svc.trainer = trainer
    return p


def run(p: ProxyServer, tenant: str, examples: list[Example] | None = None,
        held: list[Example] | None = None) -> str:
    body = {"tenant": tenant,
            "examples": [{"task": e.task, "answer": e.answer} for e in examples or train_examples()],
            "heldout": [{"task": e.task, "answer": e.answer} for e in held or heldout()]}
    r = httpx.post(p.root + "/admin/adaptation/run", headers=ADMIN, json=body, timeout=10)
    assert r.status_code == 200, r.text
    job_id: str = r.json()["id"]
    return job_id


def wait_job(p: ProxyServer, job_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{p.root}/admin/adaptation/jobs/{job_id}", headers=ADMIN, timeout=10).json()
        if job.get("finished") is not None:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def chat(p: ProxyServer, key: str, **extra: Any) -> httpx.Response:
    return httpx.post(p.url + "/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=10,
                      json={"model": BASE, "messages": [{"role": "user", "content": "question 0"}], **extra})


@pytest.mark.parametrize("mode", ["fail", "crash"])
def test_trainer_failure_leaves_the_server_answering(make_proxy: Callable[..., ProxyServer],
                                                     fake_upstream: FakeUpstream, tmp_path: Path, mode: str) -> None:
    p = proxy_with(make_proxy, fake_upstream, tmp_path, FakeTrainer(mode))
    job = wait_job(p, run(p, "tenant-a"))
    assert job["status"] == "failed" and job["error"]
    r = chat(p, "ka")
    assert r.status_code == 200 and r.json()["model"] == BASE
    st = httpx.get(p.root + "/admin/adaptation", headers=ADMIN).json()
    assert st["running"] is False and st["jobs"] == 1


def test_promoted_adapter_answers_its_tenants_plain_requests(make_proxy: Callable[..., ProxyServer],
                                                              fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    fake_upstream.script(GateScript(**{"fake-tenant-a-v1": 4}))
    p = proxy_with(make_proxy, fake_upstream, tmp_path, FakeTrainer())
    job = wait_job(p, run(p, "tenant-a"))
    assert job["status"] == "succeeded" and job["adapter"] == "fake-tenant-a-v1"
    fake_upstream.clear()
    a = chat(p, "ka", trace=True)
    assert a.status_code == 200, a.text
    assert a.json()["model"] == "fake-tenant-a-v1"
    assert a.json()["choices"][0]["message"]["content"] == "The answer is 7."
    assert a.json()["sharpen"]["trace"]["adapter"] == "fake-tenant-a-v1"
    b = chat(p, "kb")
    assert b.status_code == 200 and b.json()["model"] == BASE
    assert [c.model for c in fake_upstream.completion_calls()] == ["fake-tenant-a-v1", BASE]
    # streamed answers are routed the same way
    with httpx.stream("POST", p.url + "/chat/completions", headers={"authorization": "Bearer ka"}, timeout=10,
                      json={"model": BASE, "stream": True,
                            "messages": [{"role": "user", "content": "question 0"}]}) as s:
        assert s.status_code == 200
        assert '"model": "fake-tenant-a-v1"' in s.read().decode()
    cards = {c["id"]: c for c in httpx.get(p.url + "/models", headers={"authorization": "Bearer ka"}).json()["data"]}
    assert cards["fake-tenant-a-v1"]["parent"] == BASE
    # the in-flight counts went back to zero: nothing holds the adapter
    listed = httpx.get(p.root + "/admin/adapters", headers=ADMIN).json()["data"]
    assert [(v["name"], v["in_flight"]) for v in listed] == [("fake-tenant-a-v1", 0)]


def test_uncertain_requests_through_the_proxy_are_queued(make_proxy: Callable[..., ProxyServer],
                                                         fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    p = proxy_with(make_proxy, fake_upstream, tmp_path, FakeTrainer(), tenants=["tenant-a"])
    fake_upstream.answers = ["1", "2", "3", "4"]  # four candidates, four answers: uncertainty 0.75
    sc = {"name": "self_consistency", "n": 4, "usc": False}
    for key in ("ka", "kb"):
        assert chat(p, key, strategy=sc).status_code == 200
    fake_upstream.answers = ["42"]  # unanimous: certain
    assert chat(p, "ka", strategy=sc, messages=[{"role": "user", "content": "an easy one"}]).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        queue = httpx.get(p.root + "/admin/adaptation", headers=ADMIN).json()["queue"]
        if queue or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    assert httpx.get(p.root + "/admin/adaptation", headers=ADMIN).json()["queue"] == {"tenant-a": 1}
