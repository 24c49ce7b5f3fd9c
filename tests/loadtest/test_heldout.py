"""The held-out helper: the set is built reproducibly from outside files (GSM8K, BIG-Bench-Hard
tasks interleaved), answers keep their source's form, and the summary pairs items, splits them
by task and keeps no question text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.heldout import build, family, summary
from loadtest.machine import cpu_line


def _gsm8k(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"steps <<{i}>>\n#### {i},000"}) + "\n"
                            for i in range(n)))


def test_build_is_seeded_and_takes_the_final_answer(tmp_path: Path) -> None:
    _gsm8k(tmp_path / "test.jsonl", 20)
    build([tmp_path / "test.jsonl"], tmp_path / "a.jsonl", 5, seed=7)
    build([tmp_path / "test.jsonl"], tmp_path / "b.jsonl", 5, seed=7)
    build([tmp_path / "test.jsonl"], tmp_path / "c.jsonl", 5, seed=8)
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert (tmp_path / "a.jsonl").read_text() != (tmp_path / "c.jsonl").read_text()
    assert len(a) == 5 and all(r["answer"] == r["question"][1:-1] + "000" for r in a)  # "#### 3,000" -> "3000"
    assert [r["id"] for r in a] == [f"gsm8k-test-{i}" for i in range(5)]


def _bbh(path: Path, n: int) -> None:
    path.write_text(json.dumps({"examples": [{"input": f"{path.stem} {i} =", "target": f" {i}"} for i in range(n)]}))


def test_bbh_tasks_are_interleaved_so_a_stopped_run_covers_each_alike(tmp_path: Path) -> None:
    _bbh(tmp_path / "object_counting.json", 10)
    _bbh(tmp_path / "multistep_arithmetic_two.json", 3)
    build([tmp_path / "object_counting.json", tmp_path / "multistep_arithmetic_two.json"], tmp_path / "o.jsonl", 4,
          seed=7)
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    fams = [family(r["id"]) for r in rows]
    # 4 of the first task, all 3 of the second, one of each in turn while both last
    assert fams == ["object_counting", "multistep_arithmetic_two"] * 3 + ["object_counting"]
    assert all(r["question"].split()[1] == r["answer"] for r in rows)  # target stripped, paired with its input
    assert len({r["id"] for r in rows}) == 7
    assert family("gsm8k-test-12") == "gsm8k"


def test_summary_pairs_items_and_keeps_no_question_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = []
    for i in range(4):
        rows.append({"strategy": "passthrough", "item": f"q{i}", "correct": float(i == 0), "tokens": 10,
                     "wall_s": 1.0, "text": "secret question text"})
        if i < 3:  # q3 has no auto answer: left out of the paired figures
            rows.append({"strategy": "auto", "item": f"q{i}", "correct": 1.0, "tokens": 30, "wall_s": 2.0,
                         "text": "secret question text"})
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summary(results, "passthrough", tmp_path / "kept.jsonl") == 0
    out = capsys.readouterr().out
    assert "3 items answered by every strategy" in out
    assert out.count("items answered by every strategy") == 1  # ids from no known source: one family
    assert "| passthrough | 33.3%" in out and "| auto | 100.0%" in out and "+2/-0" in out
    kept = (tmp_path / "kept.jsonl").read_text()
    assert "secret" not in kept and len(kept.splitlines()) == 7


def test_summary_splits_by_task_when_there_are_several(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"strategy": s, "item": f"bbh-{t}-{i}", "correct": float(s == "auto" or t == "b"), "tokens": 1,
             "wall_s": 1.0} for t in ("a", "b") for i in range(2) for s in ("passthrough", "auto")]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summary(results, "passthrough", None) == 0
    out = capsys.readouterr().out
    assert "all: 4 items" in out and "a: 2 items" in out and "b: 2 items" in out
    a, b = out.split("\na: ")[1].split("\nb: ")
    assert "| passthrough | 0.0%" in a and "+2/-0" in a
    assert "| passthrough | 100.0%" in b and "+0/-0" in b


def test_cpu_line_names_the_model_and_only_the_vector_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n")
    model, cpus, flags = cpu_line(info).split(", ")
    assert model == "AMD EPYC 7B13" and cpus.endswith(" CPUs") and flags == "flags avx2"
    assert cpu_line(tmp_path / "missing") == "unknown CPU"
