"""The labeller's precision benchmark, offline, on a hand-made generation record: the shipped
``vote``/``keep`` under both rules, and which items the live path would have queued."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import label_precision as L
from loadtest import selection_rescore as R
from tests.loadtest.test_selection_rescore import _record


def _load(tmp_path: Path, *records: dict[str, object]) -> list[R.Rec]:
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return R.load([str(path)])


def test_programs_decide_where_pooling_finds_no_majority(tmp_path: Path) -> None:
    """Prose says 5 four times and 7 twice; the one program that ran printed 7 (gold). Deciding,
    the program labels 7, right where greedy (5) is wrong; pooled, 5 has 4 of 9 votes: no label."""
    (rec,) = _load(tmp_path, _record())
    assert not L.queued(rec)  # the first 4 samples agree 3 to 1: the live request was sure enough
    got = L.measure([rec], rule="programs", pal=4, min_share=0.5)
    assert got == {"kept": 1, "right": 1, "corrective": 1, "wrong": 0}
    assert L.measure([rec], rule="pooled", pal=4, min_share=0.5) == {}


def test_a_split_first_four_is_queued(tmp_path: Path) -> None:
    r = _record("report:t:1")
    r["samples"][1], r["samples"][3] = r["samples"][3], r["samples"][1]  # 5, 7, 5, 5 -> still 3 of 4
    assert not L.queued(_load(tmp_path, r)[0])
    r["samples"][0], r["samples"][2] = r["samples"][4], r["samples"][6]  # 7, 7, 9 (cut), 5: 2 of 4
    assert L.queued(_load(tmp_path, r)[0])
