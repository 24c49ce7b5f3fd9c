"""The gate's scoring order and arithmetic, on an in-process upstream that records what is in flight."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from adapt.data import Example
from adapt.gate import evaluate
from tests.fakes.transport import FakeAPI, FakeReply


class Upstream(FakeAPI):
    """Answers "The answer is <n>" where ``knows[model]`` holds the question, "no idea" elsewhere;
    records the models in flight at every moment a request starts."""

    def __init__(self, knows: dict[str, set[str]]) -> None:
        super().__init__(self._answer)
        self.knows = knows
        self.in_flight: list[str] = []
        self.seen: list[list[str]] = []

    def _answer(self, body: dict[str, Any], i: int) -> str:
        question = body["messages"][-1]["content"]
        return f"The answer is {question.split()[-1]}." if question in self.knows.get(body["model"], set()) \
            else "no idea"

    async def request(self, method: str, path: str, body: bytes | None = None, *, root: bool = False) -> FakeReply:
        model = str(orjson.loads(body or b"{}")["model"])
        self.in_flight.append(model)
        self.seen.append(list(self.in_flight))
        await asyncio.sleep(0.01)
        self.in_flight.remove(model)
        return await super().request(method, path, body, root=root)


def _ex(k: int) -> Example:
    return Example(task=f"question {k}", answer=f"The answer is {k}.", reference=str(k))


def test_the_two_models_never_overlap_and_each_pools_held_out_and_canary() -> None:
    heldout, canary = [_ex(k) for k in range(4)], [_ex(k) for k in range(10, 16)]
    up = Upstream({"new": {"question 0", "question 1", "question 2", "question 10"},
                   "old": {"question 0", "question 10", "question 11"}})
    gate = asyncio.run(evaluate(up, "new", "old", "old", heldout, 0.25, canary=canary, max_tokens=16))
    assert all(len(set(s)) == 1 for s in up.seen), "the candidate and the current model were in flight together"
    assert max(len(s) for s in up.seen) == 10  # held-out and canary of one model all at once
    assert (gate.score_new, gate.score_old) == (0.75, 0.25)
    assert (gate.canary_new, gate.canary_old, gate.canary_items) == (1 / 6, 2 / 6, 6)
    assert [(i["new"], i["old"]) for i in gate.items] == [(1.0, 1.0), (1.0, 0.0), (1.0, 0.0), (0.0, 0.0)]
    assert not gate.promote and "canary" in gate.reason  # held-out won by the margin, the canary dropped


def test_without_a_canary_the_held_out_margin_decides() -> None:
    up = Upstream({"new": {"question 0", "question 1"}, "old": {"question 0"}})
    gate = asyncio.run(evaluate(up, "new", "old", "old", [_ex(0), _ex(1)], 0.25, max_tokens=16))
    assert gate.promote and gate.canary_new is None and gate.canary_items == 0
    gate = asyncio.run(evaluate(up, "new", "old", "old", [_ex(0), _ex(1)], 0.75, max_tokens=16))
    assert not gate.promote and gate.reason.startswith("held-out 1.000 < 0.500")
