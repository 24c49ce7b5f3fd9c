"""``server.series``: the lean per-request series expose what prometheus_client's own would."""

from __future__ import annotations

from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.series import Counter, Gauge, Histogram, SeriesCollector


def _exposition(lean: bool) -> bytes:
    reg = CollectorRegistry(auto_describe=True)
    if lean:
        c: Any = Counter("t_requests", "Requests", ["strategy"])
        h: Any = Histogram("t_latency_seconds", "Latency", ["strategy"], buckets=(0.1, 1, 5))
        g: Any = Gauge("t_in_flight", "In flight")
        reg.register(SeriesCollector([c, h, g]))
    else:
        c = prometheus_client.Counter("t_requests", "Requests", ["strategy"], registry=reg)
        h = prometheus_client.Histogram("t_latency_seconds", "Latency", ["strategy"], buckets=(0.1, 1, 5),
                                        registry=reg)
        g = prometheus_client.Gauge("t_in_flight", "In flight", registry=reg)
    c.labels("passthrough").inc()
    c.labels("passthrough").inc(2)
    c.labels("best_of_n").inc()
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):  # 0.1 and 1.0 sit on bounds: they count in them (le)
        h.labels("passthrough").observe(v)
    g.inc(3)
    g.dec()
    return generate_latest(reg)


def _samples(text: bytes) -> set[str]:
    return {line for line in text.decode().splitlines() if line and "_created" not in line}


def test_the_exposition_matches_prometheus_client() -> None:
    lean, reference = _samples(_exposition(True)), _samples(_exposition(False))
    assert lean == reference
    assert 't_latency_seconds_bucket{le="0.1",strategy="passthrough"} 2.0' in lean
    assert 't_requests_total{strategy="passthrough"} 3.0' in lean


def test_wrong_label_count_and_unlabelled_use_are_refused() -> None:
    c = Counter("t_x", "x", ["a", "b"])
    with pytest.raises(ValueError, match="takes labels"):
        c.labels("only-one")
    with pytest.raises(AssertionError, match="has labels"):
        c.inc()
