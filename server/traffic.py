"""Recent traffic, aggregated in process for the status page: request rate, latency
percentiles, the strategy mix (requests, tokens, upstream calls) and the uncertainty
distribution, for everyone or for one tenant.

Prometheus (``/metrics``) keeps the lifetime counters and is what dashboards should scrape;
this is a bounded window of the latest requests so the page can answer "what is happening now"
per tenant without putting tenant names into metric labels (every key may read ``/metrics``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

UNCERTAINTY_BINS = 10  # [0, 0.1), [0.1, 0.2), ... [0.9, 1.0]


@dataclass(frozen=True, slots=True)
class Finished:
    """One answered (or failed, or abandoned) request, as the pipeline saw it at the end."""

    tenant: str
    endpoint: str
    strategy: str
    status: int  # HTTP status; 499 when the client left
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    upstream_calls: int = 0
    uncertainty: float | None = None
    at: float = 0.0  # wall-clock seconds; 0 means "now"


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation; None for no values."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Traffic:
    """A ring of the latest finished requests. ``observe`` is O(1) and runs on the event loop
    at the end of every request; summaries are computed on demand (the page polls every few
    seconds, so the cost is there and not on the request path)."""

    def __init__(self, *, capacity: int = 50_000, window_s: float = 900.0, rate_window_s: float = 60.0,
                 bucket_s: float = 10.0) -> None:
        self._ring: deque[Finished] = deque(maxlen=capacity)
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self.bucket_s = bucket_s
        self.total = 0  # every request observed since start (the ring forgets, this does not)

    def observe(self, f: Finished) -> None:
        if not f.at:
            f = Finished(f.tenant, f.endpoint, f.strategy, f.status, f.latency_s, f.prompt_tokens,
                         f.completion_tokens, f.upstream_calls, f.uncertainty, time.time())
        self._ring.append(f)
        self.total += 1

    def summary(self, tenant: str | None = None, now: float | None = None) -> dict[str, Any]:
        """The window's figures, for ``tenant`` only when given (None: everyone)."""
        now = time.time() if now is None else now
        since = now - self.window_s
        rows = [f for f in self._ring if f.at >= since and (tenant is None or f.tenant == tenant)]
        recent = sum(1 for f in rows if f.at >= now - self.rate_window_s)
        latencies = sorted(f.latency_s for f in rows if f.status < 400)
        errors = sum(1 for f in rows if f.status >= 400)
        return {
            "window_s": self.window_s,
            "requests": len(rows),
            "errors": errors,
            "rate_per_s": recent / self.rate_window_s,
            "latency_s": {name: percentile(latencies, q) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
            "series": self._series(rows, now),
            "strategies": self._strategies(rows),
            "uncertainty": self._uncertainty(rows),
            "status": self._statuses(rows),
        }

    def _series(self, rows: list[Finished], now: float) -> list[dict[str, Any]]:
        """Requests per second and p90 latency per bucket, oldest first, the whole window."""
        n = max(1, int(self.window_s // self.bucket_s))
        start = now - n * self.bucket_s
        counts = [0] * n
        lat: list[list[float]] = [[] for _ in range(n)]
        for f in rows:
            i = int((f.at - start) // self.bucket_s)
            if 0 <= i < n:
                counts[i] += 1
                if f.status < 400:
                    lat[i].append(f.latency_s)
        return [{"t": start + i * self.bucket_s, "rate_per_s": counts[i] / self.bucket_s,
                 "p90_s": percentile(sorted(lat[i]), 0.9)} for i in range(n)]

    @staticmethod
    def _strategies(rows: list[Finished]) -> list[dict[str, Any]]:
        by: dict[str, dict[str, Any]] = {}
        for f in rows:
            s = by.setdefault(f.strategy, {"strategy": f.strategy, "requests": 0, "errors": 0, "prompt_tokens": 0,
                                           "completion_tokens": 0, "upstream_calls": 0, "_lat": []})
            s["requests"] += 1
            s["errors"] += f.status >= 400
            s["prompt_tokens"] += f.prompt_tokens
            s["completion_tokens"] += f.completion_tokens
            s["upstream_calls"] += f.upstream_calls
            if f.status < 400:
                s["_lat"].append(f.latency_s)
        total = len(rows) or 1
        out = []
        for s in sorted(by.values(), key=lambda s: -int(s["requests"])):
            lat = sorted(s.pop("_lat"))
            n = s["requests"]
            s["share"] = n / total
            s["tokens_per_request"] = (s["prompt_tokens"] + s["completion_tokens"]) / n
            s["calls_per_request"] = s["upstream_calls"] / n
            s["p50_s"] = percentile(lat, 0.5)
            out.append(s)
        return out

    @staticmethod
    def _uncertainty(rows: list[Finished]) -> dict[str, Any]:
        scores = [min(max(f.uncertainty, 0.0), 1.0) for f in rows if f.uncertainty is not None]
        bins = [0] * UNCERTAINTY_BINS
        for u in scores:
            bins[min(int(u * UNCERTAINTY_BINS), UNCERTAINTY_BINS - 1)] += 1
        return {"count": len(scores), "mean": sum(scores) / len(scores) if scores else None,
                "edges": [i / UNCERTAINTY_BINS for i in range(UNCERTAINTY_BINS + 1)], "bins": bins}

    @staticmethod
    def _statuses(rows: list[Finished]) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in rows:
            out[str(f.status)] = out.get(str(f.status), 0) + 1
        return out
