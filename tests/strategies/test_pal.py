"""Program-aided candidates: the prompt, the sandbox adapter (strategies/pal.py)."""

from __future__ import annotations

from typing import Any

import pytest

from strategies import pal
from strategies.sandbox import SandboxResult


async def test_a_program_that_prints_the_answer() -> None:
    run = await pal.execute("Here:\n```python\nprint(6 * 7)\n```")
    assert run.status == "ok" and run.answer == "42"
    assert pal.as_reply("```python\nprint(6 * 7)\n```", run).endswith("The answer is 42.")


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        ("no code at all, the answer is 5", "no_code"),
        ("```python\nraise SystemExit(3)\n```", "failed"),
        ("```python\nx = 1\n```", "no_output"),
        ("```python\n1/0\n```", "failed"),
    ],
)
async def test_failures_abstain(reply: str, status: str) -> None:
    run = await pal.execute(reply)
    assert run.status == status and run.answer is None


async def test_a_timeout_abstains() -> None:
    run = await pal.execute("```python\nwhile True:\n    pass\n```", wall_s=0.5, cpu_s=1)
    assert run.status == "timeout" and run.answer is None


async def test_a_broken_sandbox_abstains(monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*a: Any, **k: Any) -> SandboxResult:
        raise OSError("cannot fork")

    monkeypatch.setattr(pal, "run_python", boom)
    run = await pal.execute("```python\nprint(1)\n```")
    assert run.status == "sandbox_error" and run.answer is None and "fork" in run.output


def test_pal_messages_append_the_instruction_to_the_last_user_turn() -> None:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    out = pal.pal_messages(msgs)
    assert out[3]["content"] == "Q2" + pal.PAL_INSTRUCTION and out[1]["content"] == "Q1"
    assert msgs[3]["content"] == "Q2"  # not modified in place
    parts = pal.pal_messages([{"role": "user", "content": [{"type": "text", "text": "Q"}]}])
    assert parts[0]["content"][-1]["type"] == "text"


@pytest.mark.parametrize(("printed", "min_votes", "expected"), [
    (["7", "8", "7", None], 2, "7"),   # two of the programs that ran, more than any other
    (["7", "8", "8", "7"], 2, None),   # a tie is not settled
    (["7", "8", "6", None], 2, None),  # no answer printed twice
    (["7", None, None, None], 2, None),
    (["7", None], 1, "7"),             # abstentions do not vote
    ([None, None], 1, None),
    ([], 1, None),
])
def test_leader_needs_votes_and_a_strict_lead(printed: list[str | None], min_votes: int, expected: str | None) -> None:
    assert pal.leader(printed, min_votes) == expected
