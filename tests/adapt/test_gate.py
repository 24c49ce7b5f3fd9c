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


class Sampling(FakeAPI):
    """``greedy[model]`` answers at temperature 0; at a temperature, choice i is right where
    ``i < right[model]``; the ``fail_samples`` model's sampled calls fail upstream, the
    ``short_samples`` model's return 2 choices whatever n asked for."""

    def __init__(self, greedy: dict[str, bool], right: dict[str, int], fail_samples: str = "",
                 short_samples: str = "") -> None:
        super().__init__(self._answer)
        self.greedy, self.right, self.fail_samples, self.short_samples = greedy, right, fail_samples, short_samples

    def _answer(self, body: dict[str, Any], i: int) -> str:
        ok = self.greedy[body["model"]] if body["temperature"] == 0.0 else i < self.right[body["model"]]
        return f"The answer is {body['messages'][-1]['content'].split()[-1] if ok else 'nothing'}."

    async def request(self, method: str, path: str, body: bytes | None = None, *, root: bool = False) -> FakeReply:
        data = orjson.loads(body or b"{}")
        if data["temperature"] != 0.0 and data["model"] == self.fail_samples:
            self.fail = 1
        if data["temperature"] != 0.0 and data["model"] == self.short_samples:
            body = orjson.dumps(data | {"n": 2})
        return await super().request(method, path, body, root=root)


def test_sampled_answers_decide_where_one_greedy_flip_would() -> None:
    # the candidate's greedy answer is wrong and the current one's right, but the candidate is
    # right 3 times in 4 samples and the current model never: 3/5 against 1/5 per item
    up = Sampling({"new": False, "old": True}, {"new": 3, "old": 0})
    gate = asyncio.run(evaluate(up, "new", "old", "old", [_ex(1), _ex(2)], 0.2, samples=4, temperature=0.7,
                                canary=[_ex(3)], max_tokens=16))
    assert (gate.score_new, gate.score_old) == (0.6, 0.2) and gate.promote, gate.reason
    assert (gate.greedy_new, gate.greedy_old, gate.samples) == (0.0, 1.0, 4)  # reported beside the score
    assert (gate.canary_new, gate.canary_old, gate.canary_greedy_new, gate.canary_greedy_old) == (0.6, 0.2, 0.0, 1.0)
    assert gate.items[0] == {"task": "question 1", "reference": "1", "new": 0.6, "old": 0.2,
                             "greedy_new": 0.0, "greedy_old": 1.0}
    sampled = [b for b in up.requests if b["temperature"] != 0.0]
    assert len(sampled) == 6 and {(b["n"], b["temperature"]) for b in sampled} == {(4, 0.7)}
    assert len(up.requests) == 12  # 3 items x 2 models x (one greedy + one n=4 call)
    # without samples the greedy answers alone decide: the same candidate is rejected
    alone = asyncio.run(evaluate(Sampling({"new": False, "old": True}, {"new": 3, "old": 0}), "new", "old", "old",
                                 [_ex(1), _ex(2)], 0.2, max_tokens=16))
    assert (alone.score_new, alone.score_old, alone.promote) == (0.0, 1.0, False)


def test_a_failed_sample_call_counts_its_answers_wrong_not_the_gate_failed() -> None:
    up = Sampling({"new": True, "old": True}, {"new": 4, "old": 4}, fail_samples="new")
    gate = asyncio.run(evaluate(up, "new", "old", "old", [_ex(1)], 0.0, samples=4, max_tokens=16))
    assert (gate.score_new, gate.score_old, gate.greedy_new) == (0.2, 1.0, 1.0) and not gate.promote
    assert gate.reason == "held-out 0.200 < 1.000 + 0.0"


def test_choices_an_upstream_did_not_return_count_as_wrong_answers() -> None:
    # both models right every time, but the candidate's n=4 calls come back with 2 choices: its
    # item scores 3 of 5 (the missing two as wrong, as a failed call's are), not 3 of 3
    up = Sampling({"new": True, "old": True}, {"new": 4, "old": 4}, short_samples="new")
    gate = asyncio.run(evaluate(up, "new", "old", "old", [_ex(1)], 0.0, samples=4, max_tokens=16))
    assert (gate.score_new, gate.score_old, gate.greedy_new) == (0.6, 1.0, 1.0) and not gate.promote


def test_a_canary_drop_within_its_own_noise_does_not_block_a_consistent_one_does() -> None:
    held, canary = [_ex(0)], [_ex(k) for k in (1, 2, 3, 4)]

    def gate(new: set[int], old: set[int], z: float) -> Any:
        up = Upstream({"new": {f"question {k}" for k in new | {0}}, "old": {f"question {k}" for k in old | {0}}})
        return asyncio.run(evaluate(up, "new", "old", "old", held, 0.0, canary=canary, canary_z=z, max_tokens=16))

    # per-item differences -1, -1, +1, 0: the mean drops 0.25 with a standard error of 0.479
    mixed = gate({3}, {1, 2}, z=1.0)
    assert (mixed.canary_new, mixed.canary_old) == (0.25, 0.5)
    assert mixed.canary_allowed_drop == 0.478714 and mixed.promote, mixed.reason
    strict = gate({3}, {1, 2}, z=0.0)  # z=0: any drop blocks
    assert not strict.promote and strict.reason == "canary 0.250 < 0.500 - 0.000"
    # every item lost: no spread, so no allowance for noise, whatever z is
    lost = gate(set(), {1, 2, 3, 4}, z=3.0)
    assert lost.canary_allowed_drop == 0.0 and not lost.promote and lost.reason == "canary 0.000 < 1.000 - 0.000"


def test_a_model_whose_canary_scores_are_known_is_not_asked_the_canary_again() -> None:
    """``known`` (adapt.canary.CanaryMemo): the next cycle's current model is this cycle's
    candidate; its canary scores are reused, only the held-out items are asked again."""
    heldout, canary = [_ex(k) for k in range(2)], [_ex(k) for k in range(10, 14)]
    up = Upstream({"new": {"question 0", "question 10", "question 12"}, "old": {"question 10", "question 11"}})
    known: dict[str, Any] = {}
    first = asyncio.run(evaluate(up, "new", "old", "old", heldout, 0.0, canary=canary, max_tokens=16, known=known))
    assert set(known) == {"new", "old"} and first.canary_reused == []
    assert (first.canary_new, first.canary_old) == (0.5, 0.5)
    up.requests.clear()
    up.knows["newer"] = {"question 0", "question 1", "question 10"}
    second = asyncio.run(evaluate(up, "newer", "new", "old", heldout, 0.0, canary=canary, max_tokens=16,
                                  known=known))
    asked = {(r["model"], r["messages"][-1]["content"]) for r in up.requests}
    assert {q for m, q in asked if m == "new"} == {"question 0", "question 1"}  # held-out only
    assert {q for m, q in asked if m == "newer"} == {f"question {k}" for k in (0, 1, 10, 11, 12, 13)}
    assert second.canary_reused == ["new"] and second.canary_old == first.canary_new == 0.5
    assert second.canary_new == 0.25 and (second.score_new, second.score_old) == (1.0, 0.5)
    assert set(known) == {"newer", "new"}  # the old current model is dropped


def test_known_scores_for_another_canary_size_are_not_used() -> None:
    heldout, canary = [_ex(0)], [_ex(k) for k in range(10, 13)]
    up = Upstream({"new": {"question 10"}, "old": set()})
    from adapt.gate import ItemScore

    known: dict[str, Any] = {"old": [ItemScore(1.0, 1.0)]}  # one item: not this canary's
    gate = asyncio.run(evaluate(up, "new", "old", "old", heldout, 0.0, canary=canary, max_tokens=16, known=known))
    assert gate.canary_reused == [] and gate.canary_old == 0.0 and len(known["old"]) == 3
