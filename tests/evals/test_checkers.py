"""Scoring answers against items: numbers, option letters, strings, code in the sandbox, and
reasoning-gym's own scorer through ``score``."""

from __future__ import annotations

from typing import Any

import pytest

from evals import checkers
from evals.datasets import Item, load
from strategies.sandbox import SandboxLimits

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("text", "expected"), [
    ("I counted them: 1,234 apples", "1234"),
    ("The answer is 1,234 apples.", "1,234"),
    ("It costs $12.50", "12.5"),
    ("The answer is $12.50.", "$12.5"),
    ("So the temperature is -3", "-3"),
    ("The answer is -3.", "-3"),
    ("\\boxed{42}", "42"),
    ("first 7, then \\boxed{42} and 99 later", "42"),
    ("The answer is 1000.0", "1,000"),
])
def test_numeric_accepts_units_commas_signs_and_boxes(text: str, expected: str) -> None:
    assert checkers.numeric(text, expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("The answer is 1,235 apples.", "1234"),
    ("It costs $12.50", "-12.5"),
    ("The answer is 3.", "-3"),
    ("\\boxed{41}", "42"),
    ("", "42"),
])
def test_numeric_rejects_other_numbers(text: str, expected: str) -> None:
    assert not checkers.numeric(text, expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("The answer is (B)", "B"),
    ("The answer is (b).", "B"),
    ("C.", "C"),
    ("I pick option D", "D"),
])
def test_choice_letters(text: str, expected: str) -> None:
    assert checkers.choice(text, expected, None)
    other = "A" if expected != "A" else "B"
    assert not checkers.choice(text, other, None)


def test_choice_by_the_options_text() -> None:
    choices = ["Paris", "London", "New York"]
    assert checkers.choice("The answer is New York.", "C", choices)
    assert checkers.choice("The answer is paris", "A", choices)
    assert not checkers.choice("The answer is New York.", "A", choices)  # text of another option
    assert not checkers.choice("The answer is Berlin.", "A", choices)
    assert not checkers.choice("The answer is New York.", "C", None)  # no choices: text cannot match


@pytest.mark.parametrize(("text", "expected", "ok"), [
    ("The answer is New   York.", "new york", True),
    ("The answer is **Blue**.", "blue", True),
    ("Answer: `Hello World`", "hello world", True),
    ("The answer is red.", "blue", False),
])
def test_string_is_normalised(text: str, expected: str, ok: bool) -> None:
    assert checkers.string(text, expected) is ok


ADD_OK = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
ADD_WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
ADD_LOOPS = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def _code_item(tests: str | None = TESTS) -> Item:
    return Item(id="c1", question="Write add(a, b).", answer="", checker="code", tests=tests)


async def test_code_passes_its_tests() -> None:
    assert await checkers.code(ADD_OK, TESTS)
    assert await checkers.score(_code_item(), ADD_OK) == 1.0


async def test_code_failing_a_test_or_missing_scores_zero() -> None:
    assert not await checkers.code(ADD_WRONG, TESTS)
    assert await checkers.score(_code_item(), ADD_WRONG) == 0.0
    assert await checkers.score(_code_item(), "def add(a, b): return a + b") == 0.0  # no code block
    assert await checkers.score(_code_item(tests=None), ADD_OK) == 0.0  # nothing to check against


async def test_code_that_never_finishes_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SandboxLimits] = []

    def short(**kw: Any) -> SandboxLimits:
        seen.append(SandboxLimits(**kw))
        return SandboxLimits(wall_s=1.0, cpu_s=1)

    monkeypatch.setattr(checkers, "SandboxLimits", short)
    assert await checkers.score(_code_item(), ADD_LOOPS) == 0.0
    assert seen and seen[0].wall_s == 10  # what the checker asks for; the test shortens it


async def test_score_dispatches_on_the_checker() -> None:
    assert await checkers.score(Item("n", "q", "1234", "numeric"), "The answer is 1,234 apples.") == 1.0
    assert await checkers.score(Item("c", "q", "B", "choice", choices=["x", "y"]), "The answer is y") == 1.0
    assert await checkers.score(Item("s", "q", "Blue", "string"), "The answer is blue.") == 1.0
    assert await checkers.score(Item("s", "q", "Blue", "string"), "The answer is red.") == 0.0


async def test_reasoning_gym_items_are_scored_by_reasoning_gym() -> None:
    (item,) = load("basic_arithmetic", limit=1, seed=3)
    assert item.checker == "reasoning_gym" and item.entry is not None
    right = f"Let me compute.\nThe answer is {item.answer}."
    assert await checkers.score(item, right) == 1.0
    assert await checkers.score(item, f"\\boxed{{{item.answer}}}") == 1.0
    wrong = str(int(item.answer) + 1) if item.answer.lstrip("-").isdigit() else item.answer + "0"
    assert await checkers.score(item, f"The answer is {wrong}.") == 0.0
    assert await checkers.score(item, "I do not know.") == 0.0  # odd text scores 0, never raises
    assert await checkers.score(item, "") == 0.0
