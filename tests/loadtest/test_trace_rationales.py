"""``loadtest/trace_rationales.py``: a program's assignments traced into worked steps."""

from __future__ import annotations

import subprocess
import sys

from loadtest.trace_rationales import majority, rationale, traced


def _run(code: str) -> str:
    program = traced(code)
    assert program is not None
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout


def test_an_expression_is_worked_out_one_operation_at_a_time() -> None:
    text, answer = rationale(_run("answer = (4 + 7 * 4 - -5) - (-4 - 1 - -4 - 4)\nprint(answer)"))
    assert answer == "42"
    assert text == ("answer = 4 + 7 * 4 - -5 - (-4 - 1 - -4 - 4)\n"
                    "= 4 + 28 - -5 - (-4 - 1 - -4 - 4)\n= 32 - -5 - (-4 - 1 - -4 - 4)\n"
                    "= 37 - (-4 - 1 - -4 - 4)\n= 37 - (-5 - -4 - 4)\n= 37 - (-1 - 4)\n= 37 - -5\n= 42\n"
                    "The answer is 42.")


def test_names_are_replaced_by_their_values_and_a_call_stops_the_reduction() -> None:
    text, answer = rationale(_run("a = 3 * 12\nb = a + 5 / 2\nc = abs(b) + 1\nprint(f'The answer is {c}')"))
    assert answer == "39.5"
    assert text == ("a = 3 * 12\n= 36\nb = a + 5 / 2\n= 36 + 5 / 2\n= 36 + 2.5\n= 38.5\n"
                    "c = abs(b) + 1\n= abs(38.5) + 1\n= 39.5\nThe answer is 39.5.")


def test_a_program_that_works_nothing_out_votes_without_a_rationale() -> None:
    assert rationale(_run("e = '4 + 7'\nresult = eval(e)\nprint(result)")) == (None, "11")
    assert traced("print(4 + 7)") is None  # nothing assigned: run as written
    assert traced("def f(:\n") is None


def test_the_programs_own_prints_stay_apart_from_the_steps() -> None:
    text, answer = rationale(_run("x = 2 * 3\nprint('working...')\ny = x * 7\nprint(y)"))
    assert answer == "42"
    assert text is not None and "working" not in text and text.endswith("= 42\nThe answer is 42.")


def test_majority_needs_two_votes_and_more_than_half() -> None:
    assert majority(["42", "42", "7", None]) == "42"
    assert majority(["42", "7", None, None]) is None
    assert majority(["42", "42", "7", "7"]) is None
    assert majority([None, None]) is None
