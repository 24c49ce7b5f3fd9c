"""Self-data augmentation against the fake upstream: sibling questions, verified answers (only
verifier-approved examples are kept), the seeded held-out split and the data hash."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapt.config import AdaptConfig
from adapt.data import Example, data_hash, siblings, split, synthesize
from server.settings import UpstreamSettings
from server.upstream import Upstream
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(60)

SETTINGS = AdaptConfig(enabled=True, bon_n=4, siblings=3)


@pytest.fixture
async def upstream(fake_upstream: FakeUpstream) -> AsyncIterator[Upstream]:
    up = Upstream(fake_upstream.url, UpstreamSettings())
    yield up
    await up.aclose()


def last_user(body: dict[str, Any]) -> str:
    return str([m for m in body["messages"] if m["role"] == "user"][-1]["content"])


def question_of(body: dict[str, Any]) -> str:
    """The question a call is about: the verifier prompt quotes it, a candidate call is it."""
    text = last_user(body)
    m = re.search(r"Question:\n(.*?)\n\nProposed answer", text, re.S)
    return m.group(1) if m else text


def kind(body: dict[str, Any]) -> str:
    text = last_user(body)
    if "new questions of the same kind" in text:
        return "siblings"
    if "Verification task:" in text:
        return "verify"
    return "answer"


ANIMALS = {"cat": ["owl", "dog", "eel"], "fox": ["bee", "yak", "dog"]}


def zorblat_script(rejected: str = "dog") -> Any:
    """Siblings swap the animal; answers follow the convention; the approval verifier rejects
    every answer about ``rejected`` (the fake's verdict line is what the verifier reads)."""

    def fn(body: dict[str, Any], i: int) -> str:
        k = kind(body)
        q = question_of(body)
        animal = re.search(r"zorblat of (\w+)", q)
        name = animal.group(1) if animal else "x"
        if k == "siblings":
            return "\n".join(f"{n + 1}. What is the zorblat of {a}?" for n, a in enumerate(ANIMALS.get(name, [])))
        if k == "verify":
            return "FINAL VERIFICATION ANSWER: " + ("False" if name == rejected else "True")
        return f"The zorblat of {name} is computed by rule Z. The answer is {name.upper()}-Z."

    return fn


# ---- siblings ---------------------------------------------------------------------------------


async def test_siblings_parses_lines_and_drops_junk(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    reply = "\n".join([
        "Sure, here are three new questions of the same kind:",  # a preamble
        "1. What is 12 times 7?",
        "2) What is 15 times 4?",
        "",
        "- What is 9 times 13?",
        "* What is 9 times 13?",  # a duplicate
        "• short",  # too short
        "The answer is 15.",  # the model answered instead
        "what is 3 times 5?",  # the original question again (any case)
        "Question 4: What is 6 times 11?",
        "Q5. Multiply 8 by 14.",
        "   What is 21 times 3?   ",
    ])
    fake_upstream.script(lambda body, i: reply)
    got = await siblings(upstream, "fake", "t", "What is 3 times 5?", 10)
    assert got == ["What is 12 times 7?", "What is 15 times 4?", "What is 9 times 13?", "What is 6 times 11?",
                   "Multiply 8 by 14.", "What is 21 times 3?"]
    [call] = fake_upstream.completion_calls()
    assert call.json["model"] == "fake"
    assert "What is 3 times 5?" in last_user(call.json) and "Write 10 new questions" in last_user(call.json)
    assert call.json["temperature"] > 0  # variety, not the greedy answer


async def test_siblings_caps_at_k(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.script(lambda body, i: "\n".join(f"Question number {n} about things?" for n in range(10)))
    assert len(await siblings(upstream, "fake", "t", "Question zero about things?", 3)) == 3


# ---- synthesize -------------------------------------------------------------------------------


async def test_synthesize_keeps_only_verifier_approved_examples(fake_upstream: FakeUpstream,
                                                                upstream: Upstream) -> None:
    fake_upstream.script(zorblat_script(rejected="dog"))
    found = await synthesize(upstream, "fake", "t", [(1, "What is the zorblat of cat?"),
                                                     (2, "What is the zorblat of fox?")], SETTINGS)
    by_task = {e.task: e for e in found}
    # every query and its siblings, except those about dogs (rejected by the approval verifier,
    # even though all four candidates agree on their answer)
    assert set(by_task) == {"What is the zorblat of cat?", "What is the zorblat of owl?",
                            "What is the zorblat of eel?", "What is the zorblat of fox?",
                            "What is the zorblat of bee?", "What is the zorblat of yak?"}
    owl = by_task["What is the zorblat of owl?"]
    assert owl.origin == 1 and by_task["What is the zorblat of yak?"].origin == 2
    assert owl.answer.endswith("The answer is OWL-Z.")
    assert owl.reference == "owl-z"
    assert owl.score >= SETTINGS.min_verifier_score
    calls = fake_upstream.completion_calls()
    cands = [c for c in calls if kind(c.json) == "answer"]
    assert cands and all(c.json["n"] == SETTINGS.bon_n for c in cands)  # best_of_n, one n=N call each
    assert sum(kind(c.json) == "verify" for c in calls) == SETTINGS.bon_n * len(cands)


async def test_synthesize_without_approval_keeps_nothing(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    def fn(body: dict[str, Any], i: int) -> str:
        if kind(body) == "verify":
            return "FINAL VERIFICATION ANSWER: False"
        if kind(body) == "siblings":
            return "What is the zorblat of emu?"
        return "The answer is 7."

    fake_upstream.script(fn)
    assert await synthesize(upstream, "fake", "t", [(1, "What is the zorblat of cat?")], SETTINGS) == []


async def test_synthesize_survives_failed_sibling_calls(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    script = zorblat_script(rejected="none")

    def fn(body: dict[str, Any], i: int) -> str:
        return "" if kind(body) == "siblings" else script(body, i)

    fake_upstream.script(fn)
    found = await synthesize(upstream, "fake", "t", [(5, "What is the zorblat of cat?")], SETTINGS)
    assert [(e.task, e.origin) for e in found] == [("What is the zorblat of cat?", 5)]

    fake_upstream.script(script)
    fake_upstream.fail_n = 1  # the sibling call fails upstream (no retries left either)
    up = Upstream(fake_upstream.url, UpstreamSettings(retries=0))
    try:
        found = await synthesize(up, "fake", "t", [(5, "What is the zorblat of cat?")], SETTINGS)
    finally:
        await up.aclose()
    assert [e.task for e in found] == ["What is the zorblat of cat?"]


async def test_synthesize_answers_with_a_teacher(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.script(zorblat_script(rejected="none"))
    with FakeUpstream(model="teacher") as teacher_fake:
        teacher_fake.script(zorblat_script(rejected="none"))
        teacher = Upstream(teacher_fake.url, UpstreamSettings())
        try:
            found = await synthesize(upstream, "fake", "t", [(1, "What is the zorblat of cat?")], SETTINGS,
                                     answerer=teacher, answer_model="teacher")
        finally:
            await teacher.aclose()
        assert len(found) == 4
        # the student writes the questions; the teacher answers and verifies them
        assert {kind(c.json) for c in fake_upstream.completion_calls()} == {"siblings"}
        assert {kind(c.json) for c in teacher_fake.completion_calls()} == {"answer", "verify"}
        assert {c.json["model"] for c in teacher_fake.completion_calls()} == {"teacher"}


# ---- split and hash ---------------------------------------------------------------------------


def exs(n: int) -> list[Example]:
    return [Example(task=f"q{i}", answer=f"The answer is {i}.", reference=str(i)) for i in range(n)]


def test_split_is_seeded_and_partitions() -> None:
    items = exs(8)
    train, held = split(items, 0.25)
    assert len(held) == 2 and len(train) == 6
    assert sorted(e.task for e in train + held) == sorted(e.task for e in items)
    assert split(items, 0.25) == (train, held)  # same seed, same split
    assert split(items, 0.25, seed=1) != (train, held)
    assert [e.task for e in items] == [f"q{i}" for i in range(8)]  # the input is not shuffled in place


@pytest.mark.parametrize(("n", "fraction", "expect"), [
    (0, 0.25, (0, 0)), (1, 0.25, (1, 0)), (2, 0.25, (1, 1)), (4, 0.0, (3, 1)), (4, 1.0, (1, 3)), (10, 0.3, (7, 3)),
])
def test_split_keeps_one_each_side(n: int, fraction: float, expect: tuple[int, int]) -> None:
    train, held = split(exs(n), fraction)
    assert (len(train), len(held)) == expect


def test_data_hash_is_stable_and_content_sensitive() -> None:
    h = data_hash(exs(5))
    assert h == data_hash(exs(5)) and len(h) == 16 and int(h, 16) >= 0
    changed = exs(5)
    changed[2].answer = "The answer is 99."
    assert data_hash(changed) != h
    assert data_hash(list(reversed(exs(5)))) != h  # order is part of the data
    assert data_hash([]) == data_hash([])


def test_example_chat_shape() -> None:
    e = Example(task="What is 2+2?", answer="The answer is 4.")
    assert e.chat() == {"messages": [{"role": "user", "content": "What is 2+2?"}], "answer": "The answer is 4."}
