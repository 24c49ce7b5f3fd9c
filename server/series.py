"""Counters, gauges and histograms for the per-request metrics, kept as plain numbers.

prometheus_client's metric objects take a lock and run several checks on every ``inc`` and
``observe``; a proxied request updates about fifteen series, which measured as the largest
single item of sharpen's own CPU per request (loadtest/overhead.py, on 2 cores). These keep the
same ``labels(...).inc()`` / ``observe()`` surface with no lock and are turned into
prometheus_client metric families only when ``/metrics`` is read (``SeriesCollector``).

They are updated from the event loop's thread only (the request path); a series that another
thread updates stays a prometheus_client object.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (``1.0``, ``0.005``)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


class Value:
    """One series of a counter or gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class Buckets:
    """One series of a histogram: a count per bucket (not cumulative), the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value on a bound counts in it
        self.sum += value


class Family:
    """A named metric with label names; ``labels`` returns the (cached) series of one label set."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], Any] = {}
        self._plain = self.labels() if not self.labelnames else None

    def _new(self) -> Any:
        return Value()

    def labels(self, *values: str) -> Any:
        found = self.series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            found = self.series[values] = self._new()
        return found

    # the unlabelled form: ``family.inc()``
    def inc(self, amount: float = 1) -> None:
        assert self._plain is not None, f"{self.name} has labels"
        self._plain.inc(amount)

    def dec(self, amount: float = 1) -> None:
        assert self._plain is not None, f"{self.name} has labels"
        self._plain.dec(amount)

    def set(self, value: float) -> None:
        assert self._plain is not None, f"{self.name} has labels"
        self._plain.set(value)

    def observe(self, value: float) -> None:
        assert self._plain is not None, f"{self.name} has labels"
        self._plain.observe(value)

    def family(self) -> Metric:
        fam: CounterMetricFamily | GaugeMetricFamily
        if self.kind == "counter":
            fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        else:
            fam = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self.series.items()):
            fam.add_metric(list(values), series.value)
        return fam


class Counter(Family):
    """Counts up; exposed as ``<name>_total``."""


class Gauge(Family):
    """Goes up and down."""

    kind = "gauge"


class Histogram(Family):
    """Observations in fixed buckets (``le`` upper bounds), their count and sum."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        super().__init__(name, documentation, labelnames)

    def _new(self) -> Any:
        return Buckets(self.bounds)

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        for values, series in list(self.series.items()):
            running, cumulative = 0, []
            for le, n in zip(les, list(series.counts), strict=True):
                running += n
                cumulative.append((le, running))
            fam.add_metric(list(values), cumulative, series.sum)
        return fam


class SeriesCollector(Collector):
    """Exposes families through a prometheus_client registry (read at scrape time)."""

    def __init__(self, families: Sequence[Family]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        for f in self.families:
            yield f.family()
