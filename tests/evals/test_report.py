"""Eval summaries: Wilson intervals, exact McNemar, per-strategy rows and table, plots and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evals import report


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (5, 10, 0.2366, 0.7634),
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (8, 10, 0.4902, 0.9433),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998)'s example
])
def test_wilson_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got = report.wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_of_nothing() -> None:
    assert report.wilson(0, 0) == (0.0, 0.0)


def _scores(pattern: list[tuple[int, int]]) -> tuple[dict[str, float], dict[str, float]]:
    base = {f"i{j}": float(a) for j, (a, _) in enumerate(pattern)}
    other = {f"i{j}": float(b) for j, (_, b) in enumerate(pattern)}
    return base, other


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 5, 0.0625),    # 2 * (1/2)^5
    (5, 0, 0.0625),
    (1, 9, 0.0215),    # 2 * (1 + 10) / 2^10
    (2, 8, 0.109),     # 2 * (1 + 10 + 45) / 2^10
    (3, 3, 1.0),
    (0, 0, 1.0),
    (0, 10, 0.00195),  # 2 / 2^10
    (0, 30, 1.86e-09),  # 2 / 2^30: not rounded to 0
])
def test_exact_mcnemar(b: int, c: int, p: float) -> None:
    both, neither = 4, 3  # concordant pairs do not count
    base, other = _scores([(1, 0)] * b + [(0, 1)] * c + [(1, 1)] * both + [(0, 0)] * neither)
    other["only-in-other"] = 1.0
    got = report.mcnemar(base, other)
    assert got == {"items": b + c + both + neither, "base_only": b, "other_only": c, "p_value": p}


def _rec(strategy: str, item: str, correct: float, tokens: int, calls: int = 1, wall_s: float = 0.5,
         **extra: Any) -> dict[str, Any]:
    return {"strategy": strategy, "item": item, "correct": correct, "tokens": tokens, "calls": calls,
            "wall_s": wall_s, **extra}


RECORDS = (
    [_rec("greedy", f"i{j}", float(j < 4), 100 + j, uncertainty=None) for j in range(10)]
    + [_rec("vote", f"i{j}", float(j < 9), 300, calls=1, wall_s=1.0, uncertainty=j / 10) for j in range(10)]
    + [_rec("auto", f"i{j}", float(j < 7), 150 if j < 5 else 500, calls=1 if j < 5 else 6, wall_s=2.0,
            uncertainty=0.05 if j < 5 else 0.65, escalated=j >= 5) for j in range(10)]
)


def test_summarize_matches_the_records() -> None:
    rows = report.summarize(RECORDS, "greedy")
    assert [r["strategy"] for r in rows] == ["greedy", "vote", "auto"]
    by = {r["strategy"]: r for r in rows}
    for s, row in by.items():
        rs = [r for r in RECORDS if r["strategy"] == s]
        assert row["items"] == len(rs) == 10
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in rs) / 10)
        assert row["tokens_per_item"] == pytest.approx(sum(r["tokens"] for r in rs) / 10)
        assert row["calls_per_item"] == pytest.approx(sum(r["calls"] for r in rs) / 10)
        assert row["wall_s_per_item"] == pytest.approx(sum(r["wall_s"] for r in rs) / 10)
        assert (row["ci_low"], row["ci_high"]) == report.wilson(row["accuracy"] * 10, 10)
    assert by["greedy"]["accuracy"] == 0.4 and by["vote"]["accuracy"] == 0.9 and by["auto"]["accuracy"] == 0.7
    assert by["greedy"]["tokens_per_item"] == pytest.approx(104.5)
    assert by["auto"]["calls_per_item"] == pytest.approx(3.5)
    assert "vs_baseline" not in by["greedy"]
    assert by["vote"]["vs_baseline"] == {"items": 10, "base_only": 0, "other_only": 5, "p_value": 0.0625}
    assert by["auto"]["vs_baseline"] == {"items": 10, "base_only": 0, "other_only": 3, "p_value": 0.25}
    assert by["auto"]["escalated"] == 0.5
    assert "escalated" not in by["vote"]
    assert all("vs_baseline" not in r for r in report.summarize(RECORDS, None))


def test_table_shows_the_rows() -> None:
    rows = report.summarize(RECORDS, "greedy")
    lines = report.table(rows).strip().splitlines()
    assert lines[0].startswith("| strategy | items | accuracy (95% CI)")
    assert len(lines) == 2 + len(rows)
    greedy, vote, auto = lines[2:]
    assert greedy == "| greedy | 10 | 40.0% (16.8% to 68.7%) | 104 | 1.0 | 0.5 | — |"
    assert vote == "| vote | 10 | 90.0% (59.6% to 98.2%) | 300 | 1.0 | 1.0 | +5/-0, p=0.0625 |"
    assert auto.startswith("| auto | 10 | 70.0% (") and auto.endswith("| 325 | 3.5 | 2.0 | +3/-0, p=0.25 |")


def test_read_skips_errors_and_cut_lines_and_keeps_the_last(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    lines = [json.dumps(_rec("a", "1", 0.0, 10)),
             json.dumps({"strategy": "a", "item": "2", "error": "boom"}),
             json.dumps(_rec("a", "1", 1.0, 20)),  # a resumed run answered it again
             json.dumps(_rec("a", "3", 1.0, 5))[:15]]
    path.write_text("\n".join(lines))
    got = report.read(path)
    assert got == [_rec("a", "1", 1.0, 20)]


def test_write_makes_plots_summary_and_report(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    summary = report.write(results, tmp_path, "greedy", "sharpen eval: test")
    pngs = [Path(p) for p in summary["plots"]]
    assert [p.name for p in pngs] == ["accuracy_vs_tokens.png", "accuracy_by_uncertainty.png"]
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    md = (tmp_path / "report.md").read_text()
    assert summary["report"] == str(tmp_path / "report.md")
    assert md.startswith("# sharpen eval: test\n")
    assert report.table(summary["rows"]) in md
    for p in pngs:
        assert f"![{p.stem}]({p.name})" in md
    assert json.loads((tmp_path / "summary.json").read_text()) == summary["rows"]
    assert summary["rows"] == report.summarize(report.read(results), "greedy")


def test_write_with_no_uncertainty_still_plots(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in RECORDS if r["strategy"] == "greedy"))
    summary = report.write(results, tmp_path, None, "t")
    assert all(Path(p).stat().st_size > 0 for p in summary["plots"])
