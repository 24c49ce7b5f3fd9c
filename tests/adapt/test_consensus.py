"""Training data from consensus against the fake upstream: clear majorities kept and the rest
counted by reason, TT-SI siblings labelled with their origin, an upstream that fails every call,
the by-origin split, easy-to-hard ordering; and the canary file's bad inputs."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from adapt import canary
from adapt.config import AdaptConfig
from adapt.consensus import (
    cycle_data,
    heldout_examples,
    label_queries,
    split,
    training_examples,
    vote_accuracy,
    vote_report,
)
from adapt.data import Example
from adapt.labeller import Label, Labeller, MajorityVote
from protocol.errors import CanaryInvalid, LabellingFailed, UpstreamStatusError
from protocol.events import Sample
from protocol.upstream import UpstreamAPI
from server.settings import UpstreamSettings
from server.upstream import Upstream
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def upstream(fake_upstream: FakeUpstream) -> AsyncIterator[Upstream]:
    up = Upstream(fake_upstream.url, UpstreamSettings())
    yield up
    await up.aclose()


def script(body: dict[str, Any], i: int) -> str:
    """'sure N' questions: every sample answers N; 'split N' questions: four different answers;
    sibling requests get two siblings of the same kind."""
    text = str(body["messages"][-1]["content"])
    if "new questions of the same kind" in text:
        n = re.search(r"(\w+) (\d+)\?", text)
        assert n is not None
        return f"What is {n.group(1)} {int(n.group(2)) + 100}?\nWhat is {n.group(1)} {int(n.group(2)) + 200}?"
    m = re.search(r"(sure|split) (\d+)", text)
    assert m is not None
    if m.group(1) == "sure":
        return f"Reasoning {i % 2}. The answer is {m.group(2)}."
    return f"Guess. The answer is {i}."


async def test_a_querys_live_samples_label_it_and_not_its_siblings(fake_upstream: FakeUpstream,
                                                                   upstream: Upstream) -> None:
    fake_upstream.script(script)
    prior = [Sample(f"Reasoning {i}. The answer is 5.", "5", "stop", -0.1) for i in range(3)]
    got = await label_queries(upstream, "fake", "t", [(1, "What is sure 5?"), (2, "What is sure 6?")], MajorityVote(4),
                              with_siblings=1, priors={1: prior})
    labelling = [c.json for c in fake_upstream.completion_calls()
                 if "new questions of the same kind" not in str(c.json["messages"])]
    assert sorted(c["n"] for c in labelling) == [1, 4, 4, 4]  # query 1 draws 1 more; siblings and query 2 draw 4
    assert got.summary()["reused_samples"] == 3 and len(got.kept) == 4


async def test_clear_majorities_are_kept_and_the_rest_counted(fake_upstream: FakeUpstream,
                                                              upstream: Upstream) -> None:
    fake_upstream.script(script)
    got = await label_queries(upstream, "fake", "t", [(1, "What is sure 5?"), (2, "What is split 6?"),
                                                      (3, "What is sure 8?")], MajorityVote(4))
    assert [(lab.task, lab.answer, lab.share, lab.origin) for lab in got.kept] == [
        ("What is sure 5?", "5", 1.0, 1), ("What is sure 8?", "8", 1.0, 3)]
    assert got.skipped == {"no_majority": 1} and got.questions == 3
    assert got.summary() == {"questions": 3, "kept": 2, "skipped": {"no_majority": 1}, "mean_share": 0.75,
                             "reused_samples": 0, "rationalized": 0, "traced": 0, "kept_by_programs": 0}
    assert len(fake_upstream.completion_calls()) == 3  # one n=4 call per question


class NoFinishedRationale(Labeller):
    """Clear labels with no finished rationale; rationalizes 'good' questions only (or fails)."""

    n = 4

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.asked: list[str] = []

    async def label(self, upstream: UpstreamAPI, model: str, tenant: str, task: str,
                    prior: Sequence[Sample] = (), rationales: int | None = None) -> Label:
        return Label(task, "5", 1.0, 0.9, 4, agreeing=["r"] if "done" in task else [],
                     program="5" if "good" in task else None)  # as when executed programs decided it

    async def rationalize(self, upstream: UpstreamAPI, model: str, tenant: str, label: Label) -> list[str]:
        self.asked.append(label.task)
        if self.fail:
            raise UpstreamStatusError(500, "down", err_type=None, param=None, code=None)
        return ["worked towards 5"] if "good" in label.task else []


async def test_labels_without_a_finished_rationale_are_rationalized(upstream: Upstream) -> None:
    labeller = NoFinishedRationale()
    got = await label_queries(upstream, "fake", "t", [(1, "good"), (2, "bad"), (3, "done")], labeller)
    assert sorted(labeller.asked) == ["bad", "good"]  # a label with its own rationale is not asked about
    assert [(lab.task, lab.agreeing, lab.rationalized) for lab in got.kept] == [
        ("good", ["worked towards 5"], True), ("done", ["r"], False)]
    assert got.skipped == {"no_finished_rationale": 1}
    assert got.summary()["rationalized"] == 1 and got.summary()["kept_by_programs"] == 1


async def test_a_failed_rationalization_skips_the_label_and_keeps_the_others(upstream: Upstream) -> None:
    got = await label_queries(upstream, "fake", "t", [(1, "good"), (3, "done")], NoFinishedRationale(fail=True))
    assert [lab.task for lab in got.kept] == ["done"] and got.skipped == {"no_finished_rationale": 1}


async def test_ttsi_labels_siblings_with_their_origin(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.script(script)
    got = await label_queries(upstream, "fake", "t", [(7, "What is sure 5?")], MajorityVote(4), with_siblings=2)
    assert sorted((lab.answer, lab.origin, lab.sibling) for lab in got.kept) == [
        ("105", 7, True), ("205", 7, True), ("5", 7, False)]


async def test_nothing_clear_fails_with_the_reasons(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.script(script)
    with pytest.raises(LabellingFailed, match="no question had a clear consensus") as e:
        await label_queries(upstream, "fake", "t", [(1, "What is split 1?")], MajorityVote(4))
    assert e.value.code == "adaptation_unlabelled"


async def test_an_upstream_that_fails_every_call(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.fault = "500"
    with pytest.raises(LabellingFailed, match="could not be labelled: all 2 labelling calls failed"):
        await label_queries(upstream, "fake", "t", [(1, "What is sure 1?"), (2, "What is sure 2?")], MajorityVote(4))


async def test_some_failed_calls_are_counted(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.script(script)
    fake_upstream.fail_n = 1
    got = await label_queries(upstream, "fake", "t", [(1, "What is sure 1?"), (2, "What is sure 2?")], MajorityVote(4),
                              concurrency=1)
    assert len(got.kept) == 1 and got.skipped == {"upstream_error": 1}


async def test_vote_accuracy_against_gold(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.script(script)
    gold = [Example("What is sure 3?", "3", reference="3"), Example("What is sure 4?", "9", reference="9"),
            Example("What is split 1?", "7", reference="7")]  # no sample says 7
    assert await vote_accuracy(upstream, "fake", "t", MajorityVote(4), gold) == pytest.approx(1 / 3)


class Broken(MajorityVote):
    async def label(self, upstream: UpstreamAPI, model: str, tenant: str, task: str,
                    prior: Sequence[Sample] = (), rationales: int | None = None) -> Label:
        raise RuntimeError("labeller bug")


async def test_the_report_vote_notes_a_failure_instead_of_raising(upstream: Upstream) -> None:
    gold = [Example("What is sure 3?", "3", reference="3")]
    assert await vote_report(upstream, "fake", "t", Broken(4), gold) == {"vote_error": "RuntimeError('labeller bug')"}


def lab(origin: int, share: float, n_agree: int = 3, sibling: bool = False) -> Label:
    return Label(f"q{origin}-{share}", str(origin), share, share, 8, agreeing=[f"r{k}" for k in range(n_agree)],
                 origin=origin, sibling=sibling)


def test_split_keeps_a_query_and_its_siblings_together() -> None:
    kept = [lab(o, 0.75, sibling=s) for o in range(6) for s in (False, True)]
    train, held = split(kept, 0.34)
    assert {x.origin for x in train}.isdisjoint({x.origin for x in held})
    assert len({x.origin for x in held}) == 2 and len(train) + len(held) == 12
    assert split(kept, 0.34) == (train, held)  # seeded


def test_training_examples_go_easy_to_hard_with_at_most_k_rationales() -> None:
    exs = training_examples([lab(1, 0.5), lab(2, 1.0, n_agree=1), lab(3, 0.75)], rationales=2)
    assert [(e.origin, e.answer, e.score) for e in exs] == [
        (2, "r0", 1.0), (3, "r0", 0.75), (3, "r1", 0.75), (1, "r0", 0.5), (1, "r1", 0.5)]
    assert all(e.reference == str(e.origin) for e in exs)
    [h] = heldout_examples([lab(4, 0.5)])
    assert h.reference == "4" and h.answer == ""


# ---- the canary file ----------------------------------------------------------------------------


def test_canary_loads_with_normalised_references(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text('{"question": "2+2?", "answer": "4.0"}\n\n{"question": "Pay?", "answer": "$1,000"}\n'
                 '{"question": "Blank", "answer": ""}\n')
    got = canary.load(f)
    assert [(e.task, e.reference) for e in got] == [("2+2?", "4"), ("Pay?", "1000")]


@pytest.mark.parametrize(("text", "message"), [
    ('{"question": "2+2?", "answer": "4"}\nnot json\n', r"c.jsonl:2: not JSON"),
    ('{"question": "2+2?"}\n', r"c.jsonl:1: an item needs a 'question'"),
    ('["a list"]\n', r"c.jsonl:1: an item needs"),
    ('{"question": "a", "answer": ""}\n{"question": "b", "answer": null}\n', r"no item with .* parseable answer \(2"),
    ("", r"no item with a question and a parseable answer \(0"),
])
def test_bad_canary_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(text)
    with pytest.raises(CanaryInvalid, match=message) as e:
        canary.load(f)
    assert e.value.code == "adaptation_canary_invalid" and e.value.status == 400


def test_missing_canary_file(tmp_path: Path) -> None:
    with pytest.raises(CanaryInvalid, match="cannot be read"):
        canary.load(tmp_path / "nope.jsonl")


class Counting(MajorityVote):
    """Labels every question '1' after a pause, counting how many are in flight at once."""

    def __init__(self) -> None:
        super().__init__(4)
        self.now = self.most = 0

    async def label(self, upstream: UpstreamAPI, model: str, tenant: str, task: str,
                    prior: Sequence[Sample] = (), rationales: int | None = None) -> Label:
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0.02)
        self.now -= 1
        return Label(task=task, answer="1", share=1.0, confidence=1.0, n=4, agreeing=["The answer is 1."])


@pytest.mark.parametrize("concurrency", [1, 3, 8])
async def test_label_concurrency_bounds_the_questions_in_flight(upstream: Upstream, concurrency: int) -> None:
    labeller = Counting()
    queries = [(i, f"What is sure {i}?") for i in range(12)]
    train, held = await cycle_data(upstream, "fake", "t", queries, labeller,
                                   AdaptConfig(label_concurrency=concurrency), {})
    assert labeller.most == concurrency
    assert len(train) + len(held) == 12


def test_the_canary_memo_empties_when_the_canary_or_a_setting_changes() -> None:
    from adapt.canary import CanaryMemo
    from adapt.config import AdaptConfig
    from adapt.gate import ItemScore

    items = [Example(task="q1", answer="The answer is 1.", reference="1")]
    memo, s = CanaryMemo(), AdaptConfig()
    memo.under(items, s).scores["m"] = [ItemScore(1.0, 1.0)]
    assert memo.under(items, AdaptConfig()).scores == {"m": [ItemScore(1.0, 1.0)]}  # same settings: kept
    assert memo.under(items, AdaptConfig(gate_samples=2)).scores == {}  # another setting: measured again
    memo.scores["m"] = [ItemScore(1.0, 1.0)]
    other = [Example(task="q2", answer="The answer is 2.", reference="2")]
    assert memo.under(other, AdaptConfig(gate_samples=2)).scores == {}  # another canary: measured again
