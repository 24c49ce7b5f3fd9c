"""The Grafana dashboard and the README against the metrics sharpen really exposes: every
series a panel queries exists, every metric appears on a panel, and the README names each."""

from __future__ import annotations

import json
import re
from pathlib import Path

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sharpen.json"


def exposed() -> set[str]:
    """Every series name /metrics renders once each metric has a sample (``_created`` aside)."""
    m = Metrics()
    m.requests.labels("e", "s", "200").inc()
    m.latency.labels("e", "s").observe(1)
    m.overhead.labels("e").observe(1)
    m.upstream_errors.labels("k").inc()
    m.count_tokens("m", 1, 1)
    m.count_strategy("s", 1, 1, 1)
    m.upstream_calls.labels("p").inc()
    m.disconnects.inc()
    m.uncertainty.labels("s").observe(0.5)
    m.record_cycle("t", "succeeded", {"heldout": {"greedy_before": 0.5}, "phases_s": {"train": 1.0},
                                      "labelling": {"kept": 1, "skipped": {"split": 1}}})
    m.replica_call("http://r:1", "ok")
    m.replica_state("http://r:1", True, 0)
    # the admin's scrape: per-model and per-tenant series are rendered only for it
    names = set(re.findall(r"^(sharpen_\w+)", m.render(admin=True).decode(), re.M))
    return {n for n in names if not n.endswith("_created")}


def families(names: set[str]) -> set[str]:
    return {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}


def test_panels_query_real_series_and_cover_every_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\b(sharpen_\w+)", e)}
    assert used - exposed() == set(), "panels query series sharpen does not expose"
    assert families(exposed()) - families(used) == set(), "metrics with no panel"
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"] for t in p.get("targets", []))


def test_layout_is_sane() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_readme_documents_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = {n for n in exposed() if n not in readme and re.sub(r"_(bucket|sum|count)$", "", n) not in readme}
    assert missing == set()
