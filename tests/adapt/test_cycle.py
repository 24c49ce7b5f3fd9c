"""The consensus cycle end to end against the fake upstream (fake trainer): labels from the vote,
data easy-to-hard, the canary gate, timed phases and the per-cycle report; and its bad inputs
(malformed canary, empty queue, a trainer that dies, a model that cannot be labelled): a clear
job status, the current adapter keeps serving, nothing queued is lost."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from adapt.service import AdaptationService
from tests.adapt.conftest import BASE, FakeTrainer, Make, done, promote, until
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(60)


class CycleScript:
    """Sampled calls (n > 1, the labeller): 'sure' questions agree on 7 in two wordings, 'split'
    ones scatter. Greedy calls (the gate): the base answers 3, adapters 7; on canary questions
    (gold 7) the base answers 7 and adapters 7 unless ``canary_drop``."""

    def __init__(self, canary_drop: bool = False) -> None:
        self.canary_drop = canary_drop

    def __call__(self, body: dict[str, Any], i: int) -> str:
        text = str(body["messages"][-1]["content"])
        adapter = body["model"] != BASE
        if (body.get("n") or 1) > 1:
            if "Canary" in text:
                return "The answer is 7."
            return f"Reasoning {i % 2}. The answer is 7." if "sure" in text else f"Guess. The answer is {i}."
        if "Canary" in text:
            return "The answer is 3." if adapter and self.canary_drop else "The answer is 7."
        return "The answer is 7." if adapter else "The answer is 3."


def queue(svc: AdaptationService, tenant: str = "a", sure: int = 4, split: int = 1) -> None:
    for k in range(sure):
        svc.queue.add(tenant, f"Zorblat sure question number {k} about {'xyzw'[k % 4] * (k + 1)}?", "", 0.9, BASE)
    for k in range(split):
        svc.queue.add(tenant, f"A split question, the {k}th, on quux {k * 7}?", "", 0.9, BASE)


def canary_file(tmp_path: Path, text: str | None = None) -> str:
    f = tmp_path / "canary.jsonl"
    f.write_text(text if text is not None else "".join(
        json.dumps({"question": f"Canary {k}?", "answer": "7"}) + "\n" for k in range(3)))
    return str(f)


async def test_consensus_cycle_promotes_and_reports(make: Make, fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    fake_upstream.script(CycleScript())
    trainer = FakeTrainer()
    svc = await make(trainer, label_n=4, rationales=2, holdout_fraction=0.25, canary=canary_file(tmp_path),
                     gate_samples=4)
    seen: list[Any] = []
    svc.on_cycle = seen.append
    queue(svc)
    job = await done(svc.run_cycle("a"))
    assert job.status == "succeeded", job.public()
    assert set(job.phases_s) == {"label", "train", "gate", "swap", "report"}
    assert all(v >= 0 for v in job.phases_s.values())
    r = job.report
    assert r["labelling"] == {"questions": 5, "kept": 4, "skipped": {"no_majority": 1}, "mean_share": 0.85,
                              "reused_samples": 0, "rationalized": 0, "traced": 0, "kept_by_programs": 0}
    # the gate's 4 samples per item (n=4 calls) are all right for both models; greedy only the adapter's
    assert r["heldout"] == {"n": 1, "greedy_before": 0.0, "greedy_after": 1.0, "score_before": 0.8,
                            "score_after": 1.0, "samples": 4, "vote": 1.0}
    assert r["canary"] == {"n": 3, "vote_before": 1.0, "greedy_before": 1.0, "greedy_after": 1.0,
                           "score_before": 1.0, "score_after": 1.0, "allowed_drop": 0.0, "reused": []}
    assert r["promoted"] is True and r["phases_s"] == job.phases_s
    assert (job.examples, job.heldout) == (6, 1)  # 3 train queries x 2 distinct agreeing rationales
    [tj] = trainer.jobs
    assert tj.hyper["curriculum"] is True
    rows = [json.loads(line) for line in (await asyncio.to_thread(Path(tj.examples).read_text)).splitlines()]
    assert {row["answer"] for row in rows} == {"Reasoning 0. The answer is 7.", "Reasoning 1. The answer is 7."}
    assert svc.registry.get(job.adapter or "").report == r  # type: ignore[union-attr]
    assert svc.acquire("a", BASE) == job.adapter
    assert svc.queue.counts() == {} and seen == [job]


async def test_a_canary_drop_blocks_promotion(make: Make, fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    fake_upstream.script(CycleScript(canary_drop=True))
    svc = await make(label_n=4, canary=canary_file(tmp_path))
    queue(svc)
    job = await done(svc.run_cycle("a"))
    assert job.status == "rejected" and job.score_new == 1.0 and job.score_old == 0.0
    assert "canary 0.000 < 1.000" in job.report["reason"]
    assert job.report["canary"]["greedy_after"] == 0.0
    assert svc.acquire("a", BASE) == BASE
    assert svc.queue.counts() == {}  # a verdict was reached: the queries are spent


async def test_canary_tolerance(make: Make, fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    fake_upstream.script(CycleScript(canary_drop=True))
    svc = await make(label_n=4, canary=canary_file(tmp_path), canary_tolerance=1.0, canary_vote=False)
    queue(svc)
    job = await done(svc.run_cycle("a"))
    assert job.status == "succeeded" and "vote_before" not in job.report["canary"]


async def test_the_next_cycle_reuses_what_the_canary_already_measured(make: Make, fake_upstream: FakeUpstream,
                                                                      tmp_path: Path) -> None:
    """A rejected cycle leaves the base current: the next cycle's gate does not ask the base the
    canary again, nor does its report vote (adapt.canary.CanaryMemo); the candidate is asked."""
    fake_upstream.script(CycleScript(canary_drop=True))
    svc = await make(label_n=4, canary=canary_file(tmp_path))
    queue(svc)
    first = await done(svc.run_cycle("a"))
    assert first.status == "rejected" and first.report["canary"]["reused"] == []
    fake_upstream.clear()
    queue(svc)
    second = await done(svc.run_cycle("a"))
    assert second.status == "rejected", second.public()
    canary = second.report["canary"]
    assert canary["reused"] == [BASE] and canary["vote_reused"] is True
    assert (canary["score_before"], canary["vote_before"]) == (first.report["canary"]["score_before"],
                                                               first.report["canary"]["vote_before"])
    asked = [(str(c.json["model"]), str(c.json["messages"][-1]["content"])) for c in fake_upstream.completion_calls()]
    assert not [q for m, q in asked if m == BASE and "Canary" in q]  # nothing on the canary for the base
    assert [q for m, q in asked if m == second.adapter and "Canary" in q]  # the candidate was asked
    svc.config.gate_samples = 2  # a setting that changes the answers: measured again
    queue(svc)
    third = await done(svc.run_cycle("a"))
    assert third.report["canary"]["reused"] == [] and "vote_reused" not in third.report["canary"]


class SecondBeatsFirst(CycleScript):
    """As ``CycleScript``, but only the second adapter answers 7 where the others answer 3, and
    each sampled canary call records which model it asked, whether that model was loaded, and how
    many greedy (gate) calls had been made by then."""

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__()
        self.fake = fake
        self.canary_votes: list[tuple[str, bool, int]] = []
        self.greedy_calls = 0

    def __call__(self, body: dict[str, Any], i: int) -> str:
        text, model = str(body["messages"][-1]["content"]), str(body["model"])
        if (body.get("n") or 1) > 1:
            if "Canary" in text:
                self.canary_votes.append((model, model == BASE or model in self.fake.adapters, self.greedy_calls))
            return super().__call__(body, i)
        self.greedy_calls += 1
        if "Canary" in text:
            return "The answer is 7."
        return "The answer is 7." if model.endswith("-v2") else "The answer is 3."


async def test_the_canary_vote_runs_after_the_swap_on_the_model_replaced(
        make: Make, fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """The vote is report-only: the new adapter is promoted first, and the adapter it replaced
    stays loaded until the vote on it is over, then is unloaded."""
    svc = await make(label_n=4)
    old = await promote(svc, fake_upstream)
    script = SecondBeatsFirst(fake_upstream)
    fake_upstream.script(script)
    svc.config.canary = canary_file(tmp_path)
    queue(svc)
    job = await done(svc.run_cycle("a"))
    assert job.status == "succeeded" and job.adapter == f"{BASE}-a-v2", job.public()
    # on the old adapter, still loaded, and only once every gate call was made
    assert script.canary_votes and set(script.canary_votes) == {(old, True, script.greedy_calls)}
    assert job.report["canary"]["vote_before"] == 1.0 and "report" in job.phases_s
    await until(lambda: old not in fake_upstream.adapters)  # then unloaded
    assert job.adapter in fake_upstream.adapters


async def current_adapter(svc: AdaptationService, fake: FakeUpstream) -> str:
    name = await promote(svc, fake)
    fake.script(CycleScript())
    return name


@pytest.mark.parametrize(("text", "reason"), [("not json\n", "not JSON"),
                                              ('{"question": "q", "answer": ""}\n', "parseable answer")])
async def test_a_bad_canary_fails_the_job_and_loses_nothing(make: Make, fake_upstream: FakeUpstream, tmp_path: Path,
                                                            text: str, reason: str) -> None:
    svc = await make(label_n=4)
    serving = await current_adapter(svc, fake_upstream)
    svc.config.canary = canary_file(tmp_path, text)
    queue(svc)
    calls = len(fake_upstream.completion_calls())
    job = await done(svc.run_cycle("a"))
    assert job.status == "failed" and reason in (job.error or "")
    assert len(fake_upstream.completion_calls()) == calls  # refused before any work
    assert svc.acquire("a", BASE) == serving
    assert svc.queue.counts() == {"a": 5}
    assert len(svc.registry.versions("a")) == 1


async def test_an_empty_queue_fails_the_job_clearly(make: Make, fake_upstream: FakeUpstream) -> None:
    svc = await make(label_n=4)
    job = await done(svc.run_cycle("a"))
    assert job.status == "failed" and job.error == "tenant 'a' has no queued uncertain queries to learn from"
    assert svc.registry.versions() == []


async def test_a_model_that_cannot_be_labelled(make: Make, fake_upstream: FakeUpstream) -> None:
    svc = await make(label_n=4)
    serving = await current_adapter(svc, fake_upstream)
    queue(svc)
    fake_upstream.fault = "500"
    try:
        job = await done(svc.run_cycle("a"))
    finally:
        fake_upstream.fault = "none"
    assert job.status == "failed" and "could not be labelled: all 5 labelling calls failed" in (job.error or "")
    assert svc.acquire("a", BASE) == serving
    assert svc.queue.counts() == {"a": 5} and job.report["queue"] == {"returned": 5, "set_aside": 0}


async def test_no_clear_majority_fails_the_job_and_keeps_the_queue(make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(CycleScript())
    svc = await make(label_n=4)
    queue(svc, sure=0, split=3)
    job = await done(svc.run_cycle("a"))
    assert job.status == "failed" and "no question had a clear consensus" in (job.error or "")
    assert re.search(r"'no_majority': 3", job.error or "")
    assert svc.queue.counts() == {"a": 3}


async def test_a_trainer_that_dies_puts_the_queries_back_then_sets_them_aside(make: Make,
                                                                            fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(CycleScript())
    svc = await make(label_n=4, max_attempts=2)
    serving = await current_adapter(svc, fake_upstream)
    svc.trainer = FakeTrainer("crash")
    queue(svc)
    job = await done(svc.run_cycle("a"))
    assert job.status == "failed" and job.error == "RuntimeError: the trainer exploded"
    assert "train" in job.phases_s and "label" in job.phases_s
    assert svc.acquire("a", BASE) == serving
    assert svc.queue.counts() == {"a": 5} and svc._cooldown["a"] > 0
    job2 = await done(svc.run_cycle("a"))  # by hand, the cool-down does not apply
    assert job2.status == "failed" and job2.report["queue"] == {"returned": 0, "set_aside": 5}
    assert svc.queue.counts() == {}
    rows = svc.queue.db.execute("SELECT status, attempts FROM uncertain").fetchall()
    assert rows == [("failed", 2)] * 5  # kept for the operator, not deleted


async def test_a_failed_trainer_outcome_has_a_reason(make: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(CycleScript())
    svc = await make(FakeTrainer("fail"), label_n=4)
    queue(svc)
    job = await done(svc.run_cycle("a"))
    assert job.status == "failed" and job.error == "out of memory"
    assert svc.queue.counts() == {"a": 5}
