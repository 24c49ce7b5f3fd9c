"""Adapter versions (durable, with lineage and eval scores) and the routing of a tenant's
requests for a base model to its active adapter.

Every version has an immutable name (``<base>-<tenant>-v<N>``): vLLM's prefix cache can serve
stale KV for a reloaded name, so a name is never reused. Switching the active version is one
dictionary assignment; the previous version is unloaded only once its in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name        TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    base        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    parent      TEXT,
    path        TEXT NOT NULL,
    status      TEXT NOT NULL,     -- training, failed, rejected, active, retired, rolled_back
    data_hash   TEXT NOT NULL DEFAULT '',
    hyper       TEXT NOT NULL DEFAULT '{}',
    score_new   REAL,
    score_old   REAL,
    created     REAL NOT NULL,
    promoted_at REAL,
    note        TEXT NOT NULL DEFAULT '',
    report      TEXT NOT NULL DEFAULT '{}'  -- the cycle's figures (JSON): labelling, gate, canary, phases
);
"""


@dataclass
class AdapterVersion:
    name: str
    tenant: str
    base: str
    version: int
    path: str
    status: str
    parent: str | None = None
    data_hash: str = ""
    hyper: dict[str, Any] = field(default_factory=dict)
    score_new: float | None = None
    score_old: float | None = None
    created: float = field(default_factory=time.time)
    promoted_at: float | None = None
    note: str = ""
    report: dict[str, Any] = field(default_factory=dict)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")[:40] or "x"


class AdapterRegistry:
    """Versions in SQLite; active routes and in-flight counts in memory (rebuilt at start)."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        if "report" not in {r[1] for r in self.db.execute("PRAGMA table_info(adapters)")}:  # an older registry
            self.db.execute("ALTER TABLE adapters ADD COLUMN report TEXT NOT NULL DEFAULT '{}'")
        self.shared = shared
        self._active: dict[tuple[str, str], str] = {}  # (tenant, base) -> adapter name
        self._in_flight: dict[str, int] = {}
        # Who owns each version, in memory: checked on every request, so no query per request.
        self._owner: dict[str, str] = {r[0]: r[1] for r in self.db.execute("SELECT name, tenant FROM adapters")}
        self._idle: dict[str, asyncio.Event] = {}

    def versions(self, tenant: str | None = None) -> list[AdapterVersion]:
        q = "SELECT * FROM adapters" + (" WHERE tenant=?" if tenant else "") + " ORDER BY created"
        return [self._row(r) for r in self.db.execute(q, (tenant,) if tenant else ())]

    def get(self, name: str) -> AdapterVersion | None:
        r = self.db.execute("SELECT * FROM adapters WHERE name=?", (name,)).fetchone()
        return self._row(r) if r else None

    @staticmethod
    def _row(r: sqlite3.Row) -> AdapterVersion:
        return AdapterVersion(name=r["name"], tenant=r["tenant"], base=r["base"], version=r["version"],
                              parent=r["parent"], path=r["path"], status=r["status"], data_hash=r["data_hash"],
                              hyper=json.loads(r["hyper"]), score_new=r["score_new"], score_old=r["score_old"],
                              created=r["created"], promoted_at=r["promoted_at"], note=r["note"],
                              report=json.loads(r["report"] or "{}"))

    def new_version(self, tenant: str, base: str, root: Path, *, parent: str | None, data_hash: str,
                    hyper: dict[str, Any]) -> AdapterVersion:
        """Reserves the next immutable name for (tenant, base)."""
        n = int(self.db.execute("SELECT COALESCE(MAX(version), 0) FROM adapters WHERE tenant=? AND base=?",
                                (tenant, base)).fetchone()[0]) + 1
        name = f"{_slug(base)}-{_slug(tenant)}-v{n}"
        while self.get(name) is not None:  # another (tenant, base) with the same slugs took it
            n += 1
            name = f"{_slug(base)}-{_slug(tenant)}-v{n}"
        v = AdapterVersion(name=name, tenant=tenant, base=base, version=n, path=str(root / name), status="training",
                           parent=parent, data_hash=data_hash, hyper=hyper)
        self.db.execute("INSERT INTO adapters (name, tenant, base, version, parent, path, status, data_hash, hyper, "
                        "created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (v.name, tenant, base, n, parent, v.path, v.status, data_hash, json.dumps(hyper), v.created))
        self._owner[v.name] = tenant
        return v

    def update(self, name: str, **fields: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [json.dumps(v) if k == "report" else v for k, v in fields.items()]
        self.db.execute(f"UPDATE adapters SET {sets} WHERE name=?", [*values, name])

    # -- routing ------------------------------------------------------------------------------

    def visible(self, tenant: str, model: str) -> bool:
        """Whether ``tenant`` may name ``model``: any non-adapter, its own adapters, or all if shared."""
        owner = self._owner.get(model)
        return owner is None or self.shared or owner == tenant

    def active(self, tenant: str, base: str) -> str | None:
        return self._active.get((tenant, base)) or (self._active.get(("*", base)) if self.shared else None)

    def restore(self) -> list[AdapterVersion]:
        """The versions that were active when the server stopped (to load again at start)."""
        rows = [self._row(r) for r in self.db.execute("SELECT * FROM adapters WHERE status='active'")]
        return rows

    def reload_routes(self) -> bool:
        """Rebuilds the routes from the versions marked active (a replica following the primary,
        which writes those marks); returns whether anything changed."""
        rows = list(self.db.execute("SELECT name, tenant, base, status FROM adapters"))
        self._owner = {r["name"]: r["tenant"] for r in rows}
        active = {("*" if self.shared else r["tenant"], r["base"]): r["name"] for r in rows if r["status"] == "active"}
        changed = active != self._active
        self._active = active  # one assignment: a request sees the old routes or the new ones
        return changed

    def activate(self, v: AdapterVersion) -> str | None:
        """Routes (tenant, base) to ``v``; returns the name it replaces."""
        key = ("*" if self.shared else v.tenant, v.base)
        old = self._active.get(key)
        self._active[key] = v.name  # the switch: one assignment, no await around it
        return old

    def deactivate(self, tenant: str, base: str) -> str | None:
        return self._active.pop(("*" if self.shared else tenant, base), None)

    def acquire(self, tenant: str, base: str, *, adapter: bool = True) -> str:
        """The model name to send upstream for this tenant's request (``adapter=False``: the base
        model, whatever is active), counted as in flight. Synchronous on purpose: the route and
        the count change together."""
        name = (self.active(tenant, base) if adapter else None) or base
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        return name

    def release(self, name: str) -> None:
        n = self._in_flight.get(name, 0) - 1
        if n > 0:
            self._in_flight[name] = n
        else:
            self._in_flight.pop(name, None)
            ev = self._idle.pop(name, None)
            if ev is not None:
                ev.set()

    async def idle(self, name: str) -> None:
        """Returns once no request is in flight on ``name``."""
        if self._in_flight.get(name, 0) == 0:
            return
        await self._idle.setdefault(name, asyncio.Event()).wait()

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def close(self) -> None:
        self.db.close()


def name_base_model(adapter_dir: Path, served_base: str) -> None:
    """Records the served base model's name in ``adapter_config.json``: vLLM's filesystem
    resolver (replicas pulling adapters from shared storage) only serves an adapter whose
    ``base_model_name_or_path`` matches the base model a request names. The training-time path
    stays in ``lineage.json``."""
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return
    cfg["base_model_name_or_path"] = served_base
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, cfg_path)
