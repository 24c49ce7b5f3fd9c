"""Prometheus metrics, in a registry owned by the app (no process-wide globals)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.series import Counter, Gauge, Histogram, SeriesCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    """sharpen's own metrics; vLLM's stay on the upstream's /metrics.

    Two registries: ``registry`` for what any key may read, ``admin_registry`` for series
    labelled with a tenant's model or adapter name (another tenant's adapter names and token
    counts are that tenant's business), rendered only for the admin."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.admin_registry = CollectorRegistry(auto_describe=True)
        # The per-request series are plain numbers (server.series), exported at scrape time.
        self.requests = Counter("sharpen_requests", "Requests answered", ["endpoint", "strategy", "status"])
        self.latency = Histogram("sharpen_request_duration_seconds", "Whole request latency",
                                 ["endpoint", "strategy"], buckets=_LATENCY_BUCKETS)
        self.overhead = Histogram("sharpen_overhead_seconds", "Time spent in sharpen itself",
                                  ["endpoint"], buckets=_OVERHEAD_BUCKETS)
        self.in_flight = Gauge("sharpen_requests_in_flight", "Requests being answered")
        self.upstream_errors = Counter("sharpen_upstream_errors", "Failed upstream interactions", ["kind"])
        self.tokens = Counter("sharpen_tokens", "Tokens spent upstream", ["kind"])
        self.model_tokens = Counter("sharpen_model_tokens", "Tokens spent upstream, by model or adapter (admin only)",
                                    ["model", "kind"])
        self.upstream_calls = Counter("sharpen_upstream_calls", "Upstream calls made", ["purpose"])
        # By strategy too (what each strategy costs); kept apart from tokens by model so that
        # neither counter multiplies the other's label values.
        self.strategy_tokens = Counter("sharpen_strategy_tokens", "Tokens spent upstream, by strategy",
                                       ["strategy", "kind"])
        self.strategy_calls = Counter("sharpen_strategy_upstream_calls", "Upstream calls made, by strategy",
                                      ["strategy"])
        self.disconnects = Counter("sharpen_client_disconnects", "Clients that left before the answer")
        self.adapter_scope = Counter("sharpen_adapter_scope", "Requests routed by an adapter's scope (adapt.scope: "
                                     "near), by who answered: adapter or base", ["answered_by"])
        self.uncertainty = Histogram("sharpen_uncertainty", "Per-request uncertainty (0 sure, 1 unsure)",
                                     ["strategy"], buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.upstream_ready = Gauge("sharpen_upstream_ready", "1 while the upstream answers")
        # several upstream replicas (server/pool.py)
        self.replica_calls = Counter("sharpen_replica_calls", "Upstream calls per replica and outcome",
                                     ["replica", "outcome"])
        self.replica_up = Gauge("sharpen_replica_up", "1 while the replica is in service", ["replica"])
        self.replica_in_flight = Gauge("sharpen_replica_in_flight", "Calls in flight on the replica", ["replica"])
        self.registry.register(SeriesCollector([
            self.requests, self.latency, self.overhead, self.in_flight, self.upstream_errors, self.tokens,
            self.upstream_calls, self.strategy_tokens, self.strategy_calls, self.disconnects, self.adapter_scope,
            self.uncertainty,
            self.upstream_ready, self.replica_calls, self.replica_up, self.replica_in_flight]))
        self.admin_registry.register(SeriesCollector([self.model_tokens]))
        a = self.admin_registry  # labelled by tenant: the admin's to read
        self.adapt_cycles = PromCounter("sharpen_adapt_cycles", "Adaptation cycles ended", ["tenant", "status"],
                                        registry=a)
        self.adapt_accuracy = PromGauge("sharpen_adapt_accuracy", "Last cycle's accuracy (split: heldout or canary; "
                                    "measure: greedy_before, greedy_after, score_before, score_after, vote_before)",
                                    ["tenant", "split", "measure"], registry=a)
        self.adapt_phase = PromGauge("sharpen_adapt_phase_seconds", "Last cycle's seconds per phase",
                                     ["tenant", "phase"], registry=a)
        self.adapt_labels = PromGauge("sharpen_adapt_labels", "Last cycle's labelled questions (kept or skipped, by "
                                  "reason)", ["tenant", "outcome"], registry=a)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        for kind, n in (("prompt", prompt), ("completion", completion)):
            if n:
                self.tokens.labels(kind).inc(n)
                self.model_tokens.labels(model, kind).inc(n)

    def record_cycle(self, tenant: str, status: str, report: dict[str, Any]) -> None:
        """An adaptation cycle's figures (``adapt.job.Job.report``)."""
        self.adapt_cycles.labels(tenant, status).inc()
        for split in ("heldout", "canary"):
            for measure in ("greedy_before", "greedy_after", "score_before", "score_after", "vote_before"):
                value = (report.get(split) or {}).get(measure)
                if isinstance(value, int | float):
                    self.adapt_accuracy.labels(tenant, split, measure).set(value)
        for phase, secs in (report.get("phases_s") or {}).items():
            self.adapt_phase.labels(tenant, phase).set(secs)
        lab = report.get("labelling") or {}
        if lab:
            self.adapt_labels.labels(tenant, "kept").set(lab.get("kept", 0))
            for reason, n in (lab.get("skipped") or {}).items():
                self.adapt_labels.labels(tenant, f"skipped_{reason}").set(n)

    def replica_call(self, replica: str, outcome: str) -> None:
        self.replica_calls.labels(replica, outcome).inc()

    def replica_state(self, replica: str, up: bool, in_flight: int) -> None:
        self.replica_up.labels(replica).set(1 if up else 0)
        self.replica_in_flight.labels(replica).set(in_flight)

    def count_strategy(self, strategy: str, prompt: int, completion: int, calls: int) -> None:
        if prompt:
            self.strategy_tokens.labels(strategy, "prompt").inc(prompt)
        if completion:
            self.strategy_tokens.labels(strategy, "completion").inc(completion)
        if calls:
            self.strategy_calls.labels(strategy).inc(calls)

    def render(self, admin: bool = False) -> bytes:
        """The exposition; the per-model series only for the admin."""
        public = generate_latest(self.registry)
        return public + generate_latest(self.admin_registry) if admin else public
