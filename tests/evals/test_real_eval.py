"""A real, tiny ``sharpen eval`` against the session's real vLLM (SmolLM2-135M on CPU) through a
sharpen: the command runs to the end and its report agrees with its per-item results."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from evals import report
from tests.proxy_server import ProxyServer

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]  # the first real test also starts vLLM

LIMIT = 4
STRATEGIES = ["passthrough", "self_consistency:n=3"]


def test_real_tiny_eval(real_proxy: ProxyServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sharpen = Path(sys.executable).with_name("sharpen")
    cmd = [str(sharpen), "eval", "--dataset", "basic_arithmetic", "--limit", str(LIMIT),
           "--strategies", ",".join(STRATEGIES), "--server", real_proxy.url, "--out", str(out),
           "--max-tokens", "64", "--concurrency", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    for name in ("accuracy_vs_tokens.png", "accuracy_by_uncertainty.png"):
        png = out / name
        assert png.read_bytes().startswith(b"\x89PNG"), name
        assert png.stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "sharpen eval: basic_arithmetic" in md
    assert "![accuracy_vs_tokens](accuracy_vs_tokens.png)" in md
    assert "![accuracy_by_uncertainty](accuracy_by_uncertainty.png)" in md

    lines = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == LIMIT * len(STRATEGIES)
    assert not [r for r in lines if r.get("error")], [r["error"] for r in lines if r.get("error")]
    records = report.read(out / "results.jsonl")
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by[str(r["strategy"])].append(r)
        assert 0.0 <= r["correct"] <= 1.0  # reasoning-gym may give partial credit
        assert r["tokens"] == r["prompt_tokens"] + r["completion_tokens"] > 0
        assert r["calls"] == 1  # both strategies make one upstream call (n samples in one)
    assert sorted(by) == sorted(STRATEGIES)
    assert all(len({r["item"] for r in rs}) == LIMIT for rs in by.values())
    # n=3 samples cost more completion tokens than one greedy answer
    assert sum(r["completion_tokens"] for r in by["self_consistency:n=3"]) > \
        sum(r["completion_tokens"] for r in by["passthrough"])

    rows = json.loads((out / "summary.json").read_text())
    assert [r["strategy"] for r in rows] == STRATEGIES
    for row in rows:
        rs = by[row["strategy"]]
        assert row["items"] == len(rs) == LIMIT
        assert row["accuracy"] == pytest.approx(sum(float(r["correct"]) for r in rs) / LIMIT)
        assert row["tokens_per_item"] == pytest.approx(sum(int(r["tokens"]) for r in rs) / LIMIT)
        assert row["calls_per_item"] == pytest.approx(1.0)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(report.wilson(row["accuracy"] * LIMIT, LIMIT))
    assert "vs_baseline" in rows[1] and rows[1]["vs_baseline"]["items"] == LIMIT
    # the printed table is the report's
    assert report.table(rows).splitlines()[2] in done.stdout
