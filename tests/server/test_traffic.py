"""The in-process traffic window behind the status page: percentiles, rates, the strategy mix,
the uncertainty histogram, the window's edge, and one tenant's view."""

from __future__ import annotations

import pytest

from server.traffic import Finished, Traffic, percentile

NOW = 1_000_000.0


def test_percentile_interpolates() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert percentile([float(i) for i in range(101)], 0.99) == pytest.approx(99.0)


def test_summary_figures() -> None:
    t = Traffic(window_s=600, rate_window_s=60, bucket_s=10)
    for i in range(100):  # tenant a: passthrough, 10..109 ms, the last 30 within the rate window
        t.observe(Finished("a", "/chat/completions", "passthrough", 200, 0.010 + i / 1000, 10, 5, 1, None,
                           at=NOW - 200 + i * 2))
    t.observe(Finished("b", "/chat/completions", "best_of_n", 200, 2.0, 100, 50, 9, 0.25, at=NOW - 5))
    t.observe(Finished("b", "/chat/completions", "best_of_n", 502, 0.5, 0, 0, 1, None, at=NOW - 4))
    t.observe(Finished("a", "/chat/completions", "self_consistency", 200, 0.3, 20, 40, 1, 0.95, at=NOW - 3))
    s = t.summary(now=NOW)
    assert s["requests"] == 103 and s["errors"] == 1
    assert s["rate_per_s"] == pytest.approx((30 + 3) / 60)
    lat = sorted([0.010 + i / 1000 for i in range(100)] + [2.0, 0.3])  # errors do not count
    assert s["latency_s"]["p50"] == pytest.approx(percentile(lat, 0.5))
    assert s["latency_s"]["p99"] == pytest.approx(percentile(lat, 0.99))
    mix = {m["strategy"]: m for m in s["strategies"]}
    assert [m["strategy"] for m in s["strategies"]] == ["passthrough", "best_of_n", "self_consistency"]
    want = {"requests": 2, "errors": 1, "prompt_tokens": 100, "completion_tokens": 50, "upstream_calls": 10}
    assert {k: mix["best_of_n"][k] for k in want} == want
    assert mix["best_of_n"]["calls_per_request"] == 5 and mix["best_of_n"]["p50_s"] == 2.0
    assert mix["passthrough"]["share"] == pytest.approx(100 / 103)
    u = s["uncertainty"]
    assert u["count"] == 2 and u["bins"][2] == 1 and u["bins"][9] == 1 and sum(u["bins"]) == 2
    assert u["mean"] == pytest.approx(0.6)
    assert s["status"] == {"200": 102, "502": 1}
    series = s["series"]
    assert len(series) == 60 and sum(b["rate_per_s"] * 10 for b in series) == pytest.approx(103)
    assert series[-1]["p90_s"] is not None


def test_tenant_view_and_window_edge() -> None:
    t = Traffic(window_s=60)
    t.observe(Finished("a", "/completions", "passthrough", 200, 0.1, at=NOW - 61))  # outside the window
    t.observe(Finished("a", "/completions", "passthrough", 200, 0.2, at=NOW - 1))
    t.observe(Finished("b", "/completions", "mcts", 200, 0.3, at=NOW - 1))
    a = t.summary("a", now=NOW)
    assert a["requests"] == 1 and [m["strategy"] for m in a["strategies"]] == ["passthrough"]
    assert t.summary("nobody", now=NOW)["requests"] == 0
    assert t.summary(now=NOW)["requests"] == 2
    assert t.total == 3


def test_bounded_and_stamped() -> None:
    t = Traffic(capacity=5)
    for _ in range(12):
        t.observe(Finished("a", "/completions", "passthrough", 200, 0.1))
    s = t.summary()
    assert s["requests"] == 5 and t.total == 12  # stamped with the current time, only the last 5 kept
