"""The automatic roll back's evidence: live confidence on a newly promoted adapter against the
confidence its tenant's traffic had just before the swap."""

from __future__ import annotations

from collections import deque


class LiveWatch:
    """Per tenant, the confidence (1 - uncertainty) of its last ``window`` requests that reported
    one, whatever model served them; per promoted adapter, its own window and a baseline. The
    baseline is the tenant's mean over a full window just before the swap: the same measure, on
    the same tenant's traffic, under the model the adapter replaced. Without that much traffic it
    is the adapter's gate score (a different measure, kept as the fallback it always was); with
    neither, the adapter is not watched. ``observe`` returns the reason to roll back once the
    adapter's full window falls ``drop`` below its baseline, and then stops watching it."""

    def __init__(self, window: int, drop: float) -> None:
        self.window, self.drop = window, drop
        self._tenant: dict[str, deque[float]] = {}
        self._own: dict[str, deque[float]] = {}
        self._baseline: dict[str, tuple[float, str]] = {}

    def promoted(self, tenant: str, name: str, gate_score: float | None) -> None:
        recent = self._tenant.get(tenant)
        if recent is not None and len(recent) == self.window:
            self._baseline[name] = (sum(recent) / len(recent), "before the swap")
        elif gate_score is not None:
            self._baseline[name] = (gate_score, "gate")
        else:
            return
        self._own[name] = deque(maxlen=self.window)

    def observe(self, tenant: str, model: str, confidence: float) -> str | None:
        self._tenant.setdefault(tenant, deque(maxlen=self.window)).append(confidence)
        own = self._own.get(model)
        if own is None:
            return None
        own.append(confidence)
        if len(own) < self.window:
            return None
        live, (baseline, source) = sum(own) / len(own), self._baseline[model]
        if live >= baseline - self.drop:
            return None
        self.forget(model)
        return f"live confidence {live:.3f} < {baseline:.3f} ({source}) - {self.drop}"

    def forget(self, name: str) -> None:
        self._own.pop(name, None)
        self._baseline.pop(name, None)
