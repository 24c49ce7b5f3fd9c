"""An adaptation cycle's figures on /metrics: accuracy before and after, phases, label counts."""

from __future__ import annotations

from server.metrics import Metrics


def test_record_cycle_exports_the_report() -> None:
    m = Metrics()
    m.record_cycle("a", "succeeded", {
        "labelling": {"questions": 5, "kept": 4, "skipped": {"no_majority": 1}},
        "heldout": {"n": 1, "greedy_before": 0.25, "greedy_after": 0.75, "vote": 1.0},
        "canary": {"n": 3, "vote_before": 0.5, "greedy_before": 1.0, "greedy_after": None},
        "phases_s": {"label": 12.5, "train": 100.0}})
    text = m.render(admin=True).decode()  # per-tenant series: the admin view
    assert 'sharpen_adapt_cycles_total{status="succeeded",tenant="a"} 1.0' in text
    assert 'sharpen_adapt_accuracy{measure="greedy_after",split="heldout",tenant="a"} 0.75' in text
    assert 'sharpen_adapt_accuracy{measure="vote_before",split="canary",tenant="a"} 0.5' in text
    assert 'measure="greedy_after",split="canary"' not in text  # not measured: not exported as 0
    assert 'sharpen_adapt_phase_seconds{phase="train",tenant="a"} 100.0' in text
    assert 'sharpen_adapt_labels{outcome="skipped_no_majority",tenant="a"} 1.0' in text
    assert 'sharpen_adapt_labels{outcome="kept",tenant="a"} 4.0' in text


def test_per_tenant_cycle_series_are_admin_only() -> None:
    m = Metrics()
    m.record_cycle("team-a", "promoted", {"heldout": {"greedy_after": 0.5}})
    assert "team-a" not in m.render().decode()
    assert "team-a" in m.render(admin=True).decode()
