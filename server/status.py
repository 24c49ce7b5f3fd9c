"""The status page's data: one JSON summary of what sharpen is doing, scoped to who asks.

An admin sees everything (every tenant's traffic, adapters and memory, and the replicas); a
tenant key sees its own tenant's traffic, adapters and memory, and the eval report (which holds
no tenant's data), never another tenant's, nor the upstream's addresses.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from server.auth import Principal
from server.eval_reports import EvalReports
from server.replay import Replay
from server.traffic import Traffic

if TYPE_CHECKING:
    from adapt.registry import AdapterVersion
    from adapt.service import AdaptationService
    from memory.service import MemoryService

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


class StatusService:
    """Builds ``/ui/api/summary`` from the services that already hold the facts."""

    def __init__(self, traffic: Traffic, evals: EvalReports, readiness: Readiness, *, refresh_s: float,
                 memory: MemoryService | None = None, replay: Replay | None = None,
                 adapt: AdaptationService | None = None, strategies: list[str] | None = None,
                 presets: dict[str, Any] | None = None) -> None:
        self.traffic = traffic
        self.evals = evals
        self.readiness = readiness
        self.refresh_s = refresh_s
        self.memory = memory
        self.replay = replay
        self.adapt = adapt
        self.strategies = strategies or []
        self.presets = presets or {}

    async def summary(self, who: Principal) -> dict[str, Any]:
        scope = None if who.admin else who.tenant
        report = self.evals.latest()
        out: dict[str, Any] = {
            "object": "sharpen.status",
            "generated_at": time.time(),
            "viewer": {"tenant": who.tenant, "admin": who.admin},
            "refresh_s": self.refresh_s,
            "traffic": self.traffic.summary(scope),
            "strategies_available": self.strategies,
            "presets": self.presets,
            "evals": report.public() if report is not None else None,
            "adapters": self._adapters(scope),
            "memory": await self._memory(scope),
        }
        if who.admin:
            ok, ready = await self.readiness()
            out["replicas"] = {"ready": ok, **ready}
        return out

    # -- adapters ---------------------------------------------------------------------------------

    def _adapters(self, tenant: str | None) -> dict[str, Any]:
        if self.adapt is None:
            return {"enabled": False, "versions": [], "history": []}
        reg = self.adapt.registry
        versions = reg.versions(tenant)
        return {"enabled": True, "base": self.adapt.base,
                "versions": [_version(v, reg.in_flight(v.name), self._lineage(v)) for v in versions],
                "history": _history(versions)}

    def _lineage(self, v: AdapterVersion) -> list[str]:
        """The chain of parents back to the base model, nearest first."""
        assert self.adapt is not None
        chain: list[str] = []
        parent = v.parent
        while parent and parent not in chain and len(chain) < 64:
            chain.append(parent)
            p = self.adapt.registry.get(parent)
            parent = p.parent if p is not None else None
        return chain

    # -- memory -----------------------------------------------------------------------------------

    async def _memory(self, tenant: str | None) -> dict[str, Any]:
        if self.memory is None:
            return {"enabled": False, "tenants": []}
        stats: dict[str, Any] = (await self.memory.run(self.memory.stats)) if self.memory.ready else {"ready": False}
        entries: dict[str, int] = dict(stats.get("tenants") or {})
        recalls = dict(self.replay.recalls) if self.replay is not None else {}
        hits = dict(self.replay.hits) if self.replay is not None else {}
        names = sorted(set(entries) | set(recalls))
        if tenant is not None:
            names = [tenant]
        rows = []
        for t in names:
            n = recalls.get(t, 0)
            rows.append({"tenant": t, "entries": entries.get(t, 0), "recalls": n, "hits": hits.get(t, 0),
                         "hit_rate": hits.get(t, 0) / n if n else None})
        out: dict[str, Any] = {"enabled": True, "ready": bool(stats.get("ready")), "tenants": rows}
        if tenant is None:
            out["entries"] = stats.get("entries")
            out["queued"] = stats.get("queued")
            out["embedder"] = stats.get("embedder")
        return out


def _version(v: AdapterVersion, in_flight: int, lineage: list[str]) -> dict[str, Any]:
    return {"name": v.name, "tenant": v.tenant, "base": v.base, "version": v.version, "parent": v.parent,
            "lineage": lineage, "status": v.status, "score_new": v.score_new, "score_old": v.score_old,
            "data_hash": v.data_hash, "hyper": v.hyper, "created": v.created, "promoted_at": v.promoted_at,
            "note": v.note, "in_flight": in_flight}


def _history(versions: list[AdapterVersion]) -> list[dict[str, Any]]:
    """Trained, promoted, rejected and rolled-back events, newest first. The registry keeps the
    time of training and of promotion; a roll back's time is not stored, so it sorts with its
    promotion and carries the recorded reason."""
    events: list[dict[str, Any]] = []
    for v in versions:
        events.append({"at": v.created, "adapter": v.name, "tenant": v.tenant, "event": "trained"})
        if v.status in ("rejected", "failed"):
            events.append({"at": v.created, "adapter": v.name, "tenant": v.tenant, "event": v.status,
                           "note": v.note})
        if v.promoted_at is not None:
            events.append({"at": v.promoted_at, "adapter": v.name, "tenant": v.tenant, "event": "promoted",
                           "score_new": v.score_new, "score_old": v.score_old})
        if v.status == "rolled_back":
            events.append({"at": (v.promoted_at or v.created) + 1e-3, "adapter": v.name, "tenant": v.tenant,
                           "event": "rolled_back", "note": v.note})
    events.sort(key=lambda e: -float(e["at"]))
    return events
