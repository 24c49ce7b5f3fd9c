"""``loadtest/adapt_bench.py``'s items from a JSONL set outside the project: disjoint blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import adapt_bench as ab


def test_a_jsonl_set_gives_disjoint_queries_canary_and_unseen_items(tmp_path: Path) -> None:
    src = tmp_path / "set.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                           for i in range(300)))
    seen = ab.items(str(src), 32, ab.SEED_A)
    canary = ab.items(str(src), 16, ab.SEED_C)
    unseen = ab.items(str(src), 150, ab.SEED_B)
    assert [it.id for it in seen] == [f"q{i}" for i in range(32)]
    assert canary[0].id == "q64" and unseen[0].id == "q128" and unseen[-1].id == "q277"
    assert not {it.id for it in seen} & {it.id for it in canary + unseen}
    assert unseen[0].checker == "numeric" and unseen[0].answer == "129"
    with pytest.raises(SystemExit, match="do not fit"):
        ab.items(str(src), 200, ab.SEED_B)  # only 172 rows from row 128
    with pytest.raises(SystemExit, match="within rows 0-63"):
        ab.items(str(src), 65, ab.SEED_A)  # would run into the canary's block
    with pytest.raises(SystemExit, match="reasoning-gym family"):
        ab.items(str(src), 10, ab.SEED_U)  # the unrelated family is another task


def test_later_cycles_take_the_next_live_rows_and_a_short_set_can_start_its_unseen_block_earlier(
        tmp_path: Path) -> None:
    src = tmp_path / "set.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                           for i in range(250)))
    second = ab.items(str(src), 32, ab.SEED_A, cycle=1)
    assert [it.id for it in second] == [f"q{i}" for i in range(32, 64)]
    with pytest.raises(SystemExit, match="do not fit"):
        ab.items(str(src), 32, ab.SEED_A, cycle=2)  # rows 64-95 are the canary's
    unseen = ab.items(str(src), 150, ab.SEED_B, unseen_from=80)
    assert unseen[0].id == "q80" and unseen[-1].id == "q229"
    assert ab.items(str(src), 16, ab.SEED_C, unseen_from=80)[-1].id == "q79"
    with pytest.raises(SystemExit, match="do not fit"):
        ab.items(str(src), 17, ab.SEED_C, unseen_from=80)  # would run into the unseen block
    with pytest.raises(SystemExit, match="do not fit"):
        ab.items(str(src), 150, ab.SEED_B, unseen_from=40)  # would start among the live queries


def test_a_reasoning_gym_family_draws_each_cycles_queries_from_its_own_seed() -> None:
    first = ab.items("letter_counting", 4, ab.SEED_A)
    second = ab.items("letter_counting", 4, ab.SEED_A, cycle=1)
    assert first[0].id == f"letter_counting-{ab.SEED_A}-0" and second[0].id == f"letter_counting-{ab.SEED_A + 1}-0"
    assert [it.question for it in first] != [it.question for it in second]
