"""An adaptation cycle as the admin API and the metrics report it: status, stage, timed phases
and the cycle's figures (labelling, gate, canary)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from adapt.gate import GateResult


@dataclass
class Job:
    """One adaptation cycle.

    ``phases_s`` holds the seconds spent labelling (or synthesizing), training, gating (load and
    both models' greedy and sampled answers), swapping and, after the verdict, the report-only
    canary vote; ``report`` the figures a cycle is judged by: greedy accuracy and the gate's score
    (greedy and samples together) on the pseudo-labelled held-out split and on the canary, before
    and after, and the vote accuracy the adapter is chasing."""

    id: str
    tenant: str
    base: str
    status: str = "queued"  # queued, running, succeeded, rejected, failed, cancelled
    stage: str = "queued"  # label (or synthesize), train, load, gate, swap, report, done
    created: float = field(default_factory=time.time)
    finished: float | None = None
    adapter: str | None = None
    examples: int = 0
    heldout: int = 0
    score_new: float | None = None
    score_old: float | None = None
    error: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    phases_s: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @contextlib.contextmanager
    def phase(self, name: str, stage: str | None = None) -> Iterator[None]:
        """Times ``name`` into ``phases_s`` (also on failure: a post-mortem wants to know where the
        time went) and shows ``stage`` (default ``name``) while it runs."""
        self.stage = stage or name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases_s[name] = round(self.phases_s.get(name, 0.0) + time.perf_counter() - t0, 2)

    def record_gate(self, gate: GateResult, heldout: int, *, consensus_labels: bool) -> None:
        """The gate's verdict and figures, into the job and its report (the held-out split's
        "vote" is 1.0 by construction where its labels are the vote)."""
        self.score_new, self.score_old = gate.score_new, gate.score_old
        self.report["heldout"] = {"n": heldout, "greedy_before": gate.greedy_old, "greedy_after": gate.greedy_new,
                                  "score_before": gate.score_old, "score_after": gate.score_new,
                                  "samples": gate.samples, "vote": 1.0 if consensus_labels else None}
        if gate.canary_items:
            self.report.setdefault("canary", {"n": gate.canary_items}).update(
                greedy_before=gate.canary_greedy_old, greedy_after=gate.canary_greedy_new,
                score_before=gate.canary_old, score_after=gate.canary_new, allowed_drop=gate.canary_allowed_drop,
                reused=gate.canary_reused)
        self.report["promoted"], self.report["reason"] = gate.promote, gate.reason
