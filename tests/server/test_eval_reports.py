"""Finding the newest eval report for the status page, and serving only its own plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from server.eval_reports import EvalReports


def write(d: Path, rows: list[dict[str, object]], mtime: float, title: str = "t") -> None:
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(rows))
    (d / "report.md").write_text(f"# {title}\n")
    (d / "accuracy_vs_tokens.png").write_bytes(b"\x89PNG")
    os.utime(d / "summary.json", (mtime, mtime))


def test_newest_of_folders_and_report_folders(tmp_path: Path) -> None:
    write(tmp_path / "many" / "old", [{"strategy": "a"}], 1000)
    write(tmp_path / "many" / "new", [{"strategy": "b"}], 3000, "newest")
    write(tmp_path / "one", [{"strategy": "c"}], 2000)
    r = EvalReports([tmp_path / "one", tmp_path / "many", tmp_path / "missing"]).latest()
    assert r is not None
    assert (r.directory.name, r.title, r.rows, r.plots) == ("new", "newest", [{"strategy": "b"}],
                                                            ["accuracy_vs_tokens.png"])
    assert EvalReports([tmp_path / "missing"]).latest() is None


def test_changes_are_picked_up_and_bad_json_is_ignored(tmp_path: Path) -> None:
    reports = EvalReports([tmp_path])
    assert reports.latest() is None
    write(tmp_path / "a", [{"strategy": "x"}], 1000)
    first = reports.latest()
    assert first is not None and first.rows == [{"strategy": "x"}]
    (tmp_path / "a" / "summary.json").write_text(json.dumps([{"strategy": "y"}]))
    os.utime(tmp_path / "a" / "summary.json", (2000, 2000))
    second = reports.latest()
    assert second is not None and second.rows == [{"strategy": "y"}]
    (tmp_path / "a" / "summary.json").write_text("{not json")
    os.utime(tmp_path / "a" / "summary.json", (3000, 3000))
    assert reports.latest() is None


def test_plot_names_only_from_the_report(tmp_path: Path) -> None:
    write(tmp_path / "a", [], 1000)
    (tmp_path / "secret.png").write_bytes(b"x")
    reports = EvalReports([tmp_path])
    assert reports.plot("accuracy_vs_tokens.png") == tmp_path / "a" / "accuracy_vs_tokens.png"
    for name in ("../secret.png", "summary.json", "report.md", "/etc/passwd", "nope.png"):
        assert reports.plot(name) is None
