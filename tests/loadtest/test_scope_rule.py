"""The scope-rule comparison: each rule's threshold and the shares it sends, on vectors whose
answers are known, and the questions read from a job folder or a slice of a JSONL set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapt.scope import scope_threshold
from loadtest.scope_rule import FLOOR, outside_questions, rule_rows


def _at(degrees: list[float]) -> np.ndarray:
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def test_the_rule_never_goes_below_the_floor_and_says_fixed_when_the_scope_is_too_small() -> None:
    tight = _at([i * 0.5 for i in range(40)])  # forty questions half a degree apart
    assert scope_threshold(tight, FLOOR, None) == FLOOR
    assert scope_threshold(tight, FLOOR, 0.95) == pytest.approx(np.cos(np.radians(0.5)), abs=1e-5)
    assert scope_threshold(tight, FLOOR, 0.99) == FLOOR  # k = floor(0.01 x 41) = 0: forty questions cannot say
    assert scope_threshold(_at([0, 90, 180, 270] * 10), FLOOR, 0.9) == FLOOR  # spread questions: the floor holds
    assert scope_threshold(tight, 0.3, None) == 0.3
    assert scope_threshold(tight, 0.3, 0.95) == scope_threshold(tight, FLOOR, 0.95)  # above either floor


def test_rule_rows_count_what_each_threshold_sends() -> None:
    scope = _at([i * 0.5 for i in range(40)])  # 0-19.5 degrees
    own = _at([5.25, 10.25, 19.0, 30.0])  # three inside, one 10.5 degrees past the last
    others = {"near": _at([40.0, 50.0]), "far": _at([120.0, 150.0])}  # cos 20.5 deg = 0.937, cos 30.5 = 0.862
    fixed, cov = rule_rows("t", scope, own, others, [None, 0.95])
    assert fixed.startswith("| t | fixed | 0.550 | 100.0% ") and "| 50.0% " in fixed and "near 100.0%" in fixed
    assert cov.startswith("| t | 0.95 | 1.000 | 75.0% ") and "| 0.0% " in cov


def test_outside_questions_read_a_job_folder_or_a_slice_of_a_jsonl(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "question": f"{i} + {i} =", "answer": str(2 * i)} for i in range(6)]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = outside_questions(f"{tmp_path / 'set.jsonl'}:2:4")
    assert len(got) == 2 and got[0].startswith("2 + 2 =") and got[1].startswith("3 + 3 =")
    assert len(outside_questions(str(tmp_path / "set.jsonl"))) == 6
    job = tmp_path / "job"
    job.mkdir()
    (job / "train.jsonl").write_text("".join(json.dumps({"task": q}) + "\n" for q in ("A?", "B?")))
    (job / "heldout.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "C?"}]}) + "\n")
    assert outside_questions(f"{job}/") == ["A?", "B?", "C?"]
