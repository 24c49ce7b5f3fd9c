"""Worked steps from a program: each top-level assignment worked out one operation at a time."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from strategies.trace import steps, traced, worked_out


def _run(code: str) -> str:
    program = traced(code)
    assert program is not None
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout


def test_an_expression_is_worked_out_one_operation_at_a_time() -> None:
    text, answer = steps(_run("answer = (4 + 7 * 4 - -5) - (-4 - 1 - -4 - 4)\nprint(answer)"))
    assert answer == "42"
    assert text == ("answer = 4 + 7 * 4 - -5 - (-4 - 1 - -4 - 4)\n"
                    "= 4 + 28 - -5 - (-4 - 1 - -4 - 4)\n= 32 - -5 - (-4 - 1 - -4 - 4)\n"
                    "= 37 - (-4 - 1 - -4 - 4)\n= 37 - (-5 - -4 - 4)\n= 37 - (-1 - 4)\n= 37 - -5\n= 42\n"
                    "The answer is 42.")


def test_names_are_replaced_by_their_values_and_a_call_stops_the_reduction() -> None:
    text, answer = steps(_run("a = 3 * 12\nb = a + 5 / 2\nc = abs(b) + 1\nprint(f'The answer is {c}')"))
    assert answer == "39.5"
    assert text == ("a = 3 * 12\n= 36\nb = a + 5 / 2\n= 36 + 5 / 2\n= 36 + 2.5\n= 38.5\n"
                    "c = abs(b) + 1\n= abs(38.5) + 1\n= 39.5\nThe answer is 39.5.")


def test_a_program_that_works_nothing_out_has_an_answer_and_no_working() -> None:
    assert steps(_run("e = '4 + 7'\nresult = eval(e)\nprint(result)")) == (None, "11")
    assert traced("print(4 + 7)") is None  # nothing assigned: it runs as written
    assert traced("def f(:\n") is None


def test_the_programs_own_prints_and_names_stay_apart_from_the_working() -> None:
    # A program's own variable named like the marker does not break the working.
    text, answer = steps(_run("MARK = 1\nx = 2 * 3\nprint('working...')\ny = x * 7\nprint(y)"))
    assert answer == "42"
    assert text is not None and "working" not in text and text.endswith("= 42\nThe answer is 42.")


def test_a_loop_of_working_is_no_rationale() -> None:
    out = "".join(f"\x02x = {i} + 1\n\x02= {i + 1}\n" for i in range(30)) + "31\n"
    assert steps(out) == (None, "31")


async def test_worked_out_runs_the_traced_program_in_the_sandbox() -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("the sandbox needs bubblewrap (make system-deps installs it)")
    text, answer = await worked_out("Here:\n```python\nt = 6 * 7 - 2\nprint(t)\n```")
    assert (text, answer) == ("t = 6 * 7 - 2\n= 42 - 2\n= 40\nThe answer is 40.", "40")
    assert await worked_out("no code at all") == (None, None)
    assert await worked_out("```python\nx = 1 / 0\n```") == (None, None)
