"""The durable queue of uncertain queries (SQLite), per tenant, de-duplicated by embedding
similarity against the tenant's pending queries. A query keeps the candidates its request
already drew (``samples``, JSON), so labelling it draws only the rest."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memory.embedder import Embedder
from protocol.events import Sample

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uncertain (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT NOT NULL,
    task        TEXT NOT NULL,
    answer      TEXT NOT NULL DEFAULT '',
    uncertainty REAL NOT NULL,
    model       TEXT NOT NULL,
    vector      BLOB NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending',   -- pending, used, failed
    created     REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    samples     TEXT NOT NULL DEFAULT '[]'           -- the candidates the request drew (JSON)
);
CREATE INDEX IF NOT EXISTS uncertain_tenant ON uncertain (tenant, status);
"""


@dataclass
class UncertainQuery:
    id: int
    tenant: str
    task: str
    answer: str
    uncertainty: float
    model: str
    samples: list[Sample] = field(default_factory=list)


class UncertainQueue:
    """Not thread-safe: the adaptation service calls it from one worker thread."""

    def __init__(self, path: Path, embedder: Embedder, *, dedup_similarity: float = 0.9) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(uncertain)")}
        if "attempts" not in cols:  # a queue written before attempts were counted
            self.db.execute("ALTER TABLE uncertain ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
        if "samples" not in cols:  # a queue written before samples were kept
            self.db.execute("ALTER TABLE uncertain ADD COLUMN samples TEXT NOT NULL DEFAULT '[]'")
        self.embedder = embedder
        self.dedup = dedup_similarity

    def add(self, tenant: str, task: str, answer: str, uncertainty: float, model: str,
            samples: list[Sample] | None = None) -> bool:
        """Queues the query unless a near-identical one is already pending for the tenant."""
        vec = self.embedder.embed([task])[0]
        for (blob,) in self.db.execute("SELECT vector FROM uncertain WHERE tenant=? AND status='pending'", (tenant,)):
            if float(np.dot(np.frombuffer(blob, dtype=np.float32), vec)) >= self.dedup:
                return False
        self.db.execute("INSERT INTO uncertain (tenant, task, answer, uncertainty, model, vector, created, samples) "
                        "VALUES (?,?,?,?,?,?,?,?)", (tenant, task, answer, uncertainty, model,
                                                     np.asarray(vec, dtype=np.float32).tobytes(), time.time(),
                                                     json.dumps([asdict(x) for x in samples or []])))
        return True

    def pending(self, tenant: str, limit: int = 1000) -> list[UncertainQuery]:
        rows = self.db.execute("SELECT id, tenant, task, answer, uncertainty, model, samples FROM uncertain "
                               "WHERE tenant=? AND status='pending' ORDER BY uncertainty DESC, id LIMIT ?",
                               (tenant, limit))
        return [UncertainQuery(r[0], r[1], r[2], r[3], r[4], r[5], [Sample(**x) for x in json.loads(r[6])])
                for r in rows]

    def counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self.db.execute(
            "SELECT tenant, COUNT(*) FROM uncertain WHERE status='pending' GROUP BY tenant")}

    def mark_used(self, ids: list[int]) -> None:
        if ids:
            q = ",".join("?" * len(ids))
            self.db.execute(f"UPDATE uncertain SET status='used' WHERE id IN ({q})", ids)

    def release(self, ids: list[int], max_attempts: int) -> int:
        """A failed cycle's queries go back to pending, or, after ``max_attempts`` failures, to
        ``failed`` (kept for the operator, not retried). Returns how many went back."""
        if not ids:
            return 0
        q = ",".join("?" * len(ids))
        self.db.execute(f"UPDATE uncertain SET attempts=attempts+1 WHERE id IN ({q})", ids)
        self.db.execute(f"UPDATE uncertain SET status=CASE WHEN attempts>=? THEN 'failed' ELSE 'pending' END "
                        f"WHERE id IN ({q})", [max_attempts, *ids])
        row = self.db.execute(f"SELECT COUNT(*) FROM uncertain WHERE status='pending' AND id IN ({q})", ids).fetchone()
        return int(row[0])

    def close(self) -> None:
        self.db.close()
