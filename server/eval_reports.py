"""The latest ``sharpen eval`` report on disk, for the status page.

``sharpen eval --out DIR`` writes ``summary.json`` (one row per strategy: accuracy with its 95%
Wilson interval, tokens, calls, the paired test against the baseline), ``report.md`` and PNG
plots into DIR. The page shows the newest such folder found in the configured places: each
place is either a report folder itself or a folder of report folders (one level down).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PLOT = re.compile(r"^[A-Za-z0-9_.-]+\.png$")


@dataclass(frozen=True)
class EvalReport:
    """One eval output folder."""

    directory: Path
    title: str
    rows: list[dict[str, Any]]
    plots: list[str]  # file names inside ``directory``
    written_at: float

    def public(self) -> dict[str, Any]:
        return {"name": self.directory.name, "title": self.title, "rows": self.rows, "plots": self.plots,
                "written_at": self.written_at}


class EvalReports:
    """Finds the newest report under ``places``; reads it again only when it changed."""

    def __init__(self, places: list[Path]) -> None:
        self.places = places
        self._cache: tuple[Path, float, EvalReport] | None = None

    def _candidates(self) -> list[Path]:
        out = []
        for place in self.places:
            if (place / "summary.json").is_file():
                out.append(place / "summary.json")
            elif place.is_dir():
                out.extend(p for p in place.glob("*/summary.json") if p.is_file())
        return out

    def latest(self) -> EvalReport | None:
        found = []
        for p in self._candidates():
            try:
                found.append((p.stat().st_mtime, p))
            except OSError:
                continue
        if not found:
            return None
        mtime, summary = max(found)
        if self._cache is not None and self._cache[0] == summary and self._cache[1] == mtime:
            return self._cache[2]
        try:
            rows = json.loads(summary.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(rows, list):
            return None
        d = summary.parent
        title = d.name
        try:
            first = (d / "report.md").read_text().splitlines()[0]
            title = first.lstrip("# ").strip() or title
        except (OSError, IndexError):
            pass
        plots = sorted(p.name for p in d.glob("*.png") if _PLOT.match(p.name))
        report = EvalReport(d, title, [r for r in rows if isinstance(r, dict)], plots, mtime)
        self._cache = (summary, mtime, report)
        return report

    def plot(self, name: str) -> Path | None:
        """The path of one of the latest report's plots; None for anything else (no traversal:
        only names the report lists are served)."""
        report = self.latest()
        if report is None or name not in report.plots:
            return None
        return report.directory / name
