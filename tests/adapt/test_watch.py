"""The automatic roll back's evidence (``adapt.watch.LiveWatch``), without a service around it."""

from __future__ import annotations

from adapt.watch import LiveWatch


def test_the_baseline_is_the_tenants_full_window_before_the_swap_else_the_gate_else_nothing() -> None:
    w = LiveWatch(window=2, drop=0.1)
    w.observe("a", "base", 0.9)
    w.promoted("a", "v1", gate_score=0.3)  # one answer before: not a full window, so the gate's 0.3
    assert w.observe("a", "v1", 0.15) is None and w.observe("a", "v1", 0.05) == \
        "live confidence 0.100 < 0.300 (gate) - 0.1"
    assert w.observe("a", "v1", 0.0) is None  # rolled back: no longer watched
    w.observe("b", "base", 0.8)
    w.observe("b", "base", 0.6)
    w.observe("a", "base", 0.1)  # another tenant's traffic is not b's baseline
    w.promoted("b", "v2", gate_score=0.1)
    assert w.observe("b", "v2", 0.7) is None and w.observe("b", "v2", 0.6) is None  # 0.65 >= 0.7 - 0.1
    assert w.observe("b", "v2", 0.45) == "live confidence 0.525 < 0.700 (before the swap) - 0.1"
    w.promoted("c", "v3", gate_score=None)  # no traffic and no gate score: not watched at all
    assert w.observe("c", "v3", 0.0) is None and w.observe("c", "v3", 0.0) is None
