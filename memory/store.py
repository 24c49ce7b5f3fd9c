"""Durable experience metadata (and vectors) in SQLite, WAL mode.

SQLite is the source of truth: an experience is acknowledged once its transaction commits
(``synchronous=FULL``), and the FAISS index can always be rebuilt from the vectors stored here.
Not thread-safe by itself: the memory service uses it from one worker thread only.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memory.embedder import Vectors

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiences (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,   -- also the vector's id in the index
    uid       TEXT NOT NULL UNIQUE,                -- the public id
    tenant    TEXT NOT NULL,
    task      TEXT NOT NULL,
    answer    TEXT NOT NULL,
    score     REAL NOT NULL,
    kind      TEXT NOT NULL DEFAULT 'success',     -- 'success' or 'pitfall'
    insights  TEXT NOT NULL DEFAULT '',
    workflow  TEXT NOT NULL DEFAULT '',
    source    TEXT NOT NULL DEFAULT '',            -- 'strategy', 'feedback', 'import'
    digest    TEXT NOT NULL,
    vector    BLOB NOT NULL,
    created   REAL NOT NULL,
    last_used REAL NOT NULL,
    uses      INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, digest)
);
CREATE INDEX IF NOT EXISTS experiences_tenant_use ON experiences (tenant, score, last_used);
"""


@dataclass
class Experience:
    """One remembered task: what was asked, what worked (or failed), and what was learned."""

    tenant: str
    task: str
    answer: str
    score: float
    kind: str = "success"
    insights: str = ""
    workflow: str = ""
    source: str = ""
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    id: int | None = None
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    uses: int = 0

    def digest(self) -> str:
        return hashlib.sha256(f"{self.task.strip().lower()}\x00{self.answer.strip()}".encode()).hexdigest()

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("id", None)
        d["id"] = d.pop("uid")
        return d


_COLS = "id, uid, tenant, task, answer, score, kind, insights, workflow, source, created, last_used, uses"


def _row(r: sqlite3.Row) -> Experience:
    return Experience(id=r["id"], uid=r["uid"], tenant=r["tenant"], task=r["task"], answer=r["answer"],
                      score=r["score"], kind=r["kind"], insights=r["insights"], workflow=r["workflow"],
                      source=r["source"], created=r["created"], last_used=r["last_used"], uses=r["uses"])


class ExperienceStore:
    """The SQLite side of the memory."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit survives a crash of the process or the OS
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)

    def insert(self, items: list[tuple[Experience, Vectors]]) -> list[Experience]:
        """Inserts in one transaction; an exact duplicate (same tenant, task and answer) updates
        the existing row's score and use time instead. Returns the rows as stored."""
        with self.transaction():
            return [self.insert_one(exp, vec) for exp, vec in items]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: everything inside commits together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def insert_one(self, exp: Experience, vec: Vectors) -> Experience:
        """Inserts one row (or updates its exact duplicate); call inside ``transaction()``."""
        digest = exp.digest()
        row = self.db.execute("SELECT " + _COLS + " FROM experiences WHERE tenant=? AND digest=?",
                              (exp.tenant, digest)).fetchone()
        if row is not None:
            self.db.execute("UPDATE experiences SET score=MAX(score, ?), last_used=? WHERE id=?",
                            (exp.score, time.time(), row["id"]))
            return _row(row)
        cur = self.db.execute(
            "INSERT INTO experiences (uid, tenant, task, answer, score, kind, insights, workflow, source, "
            "digest, vector, created, last_used, uses) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (exp.uid, exp.tenant, exp.task, exp.answer, exp.score, exp.kind, exp.insights, exp.workflow,
             exp.source, digest, np.asarray(vec, dtype=np.float32).tobytes(), exp.created, exp.last_used,
             exp.uses))
        exp.id = cur.lastrowid
        return exp

    def has_digest(self, tenant: str, digest: str) -> bool:
        return self.db.execute("SELECT 1 FROM experiences WHERE tenant=? AND digest=?",
                               (tenant, digest)).fetchone() is not None

    def merge(self, id_: int, exp: Experience) -> Experience | None:
        """Folds ``exp`` into the existing row ``id_`` (a near-duplicate task): a better score
        replaces the answer (and clears the now stale insights); otherwise only its use time."""
        row = self.get([id_]).get(id_)
        if row is None:
            return None
        if exp.score > row.score:
            self.db.execute("UPDATE experiences SET answer=?, score=?, kind=?, insights='', workflow='', "
                            "last_used=? WHERE id=?", (exp.answer, exp.score, exp.kind, time.time(), id_))
            row.answer, row.score, row.kind, row.insights, row.workflow = exp.answer, exp.score, exp.kind, "", ""
            # Keep the exact-duplicate key in step with the new answer (unless another row has it).
            self.db.execute("UPDATE OR IGNORE experiences SET digest=? WHERE id=?", (row.digest(), id_))
        else:
            self.db.execute("UPDATE experiences SET last_used=? WHERE id=?", (time.time(), id_))
        return row

    def get(self, ids: list[int]) -> dict[int, Experience]:
        if not ids:
            return {}
        q = ",".join("?" * len(ids))
        return {r["id"]: _row(r) for r in self.db.execute(f"SELECT {_COLS} FROM experiences WHERE id IN ({q})", ids)}

    def by_uid(self, uid: str) -> Experience | None:
        r = self.db.execute(f"SELECT {_COLS} FROM experiences WHERE uid=?", (uid,)).fetchone()
        return _row(r) if r else None

    def touch(self, ids: list[int]) -> None:
        if ids:
            q = ",".join("?" * len(ids))
            self.db.execute(f"UPDATE experiences SET last_used=?, uses=uses+1 WHERE id IN ({q})", [time.time(), *ids])

    def update_insights(self, id_: int, insights: str, workflow: str) -> None:
        self.db.execute("UPDATE experiences SET insights=?, workflow=? WHERE id=?", (insights, workflow, id_))

    def delete(self, ids: list[int]) -> int:
        if not ids:
            return 0
        q = ",".join("?" * len(ids))
        return self.db.execute(f"DELETE FROM experiences WHERE id IN ({q})", ids).rowcount

    def delete_tenant(self, tenant: str) -> list[int]:
        ids = [r[0] for r in self.db.execute("SELECT id FROM experiences WHERE tenant=?", (tenant,))]
        self.db.execute("DELETE FROM experiences WHERE tenant=?", (tenant,))
        return ids

    def evictable(self, tenant: str, keep: int) -> list[int]:
        """Ids over a tenant's limit: lowest score first, then least recently used."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM experiences WHERE tenant=? ORDER BY score DESC, last_used DESC LIMIT -1 OFFSET ?",
            (tenant, keep))]

    def count(self, tenant: str | None = None) -> int:
        if tenant is None:
            return int(self.db.execute("SELECT COUNT(*) FROM experiences").fetchone()[0])
        return int(self.db.execute("SELECT COUNT(*) FROM experiences WHERE tenant=?", (tenant,)).fetchone()[0])

    def tenants(self) -> dict[str, tuple[int, int]]:
        """tenant -> (count, max id): what the index of that tenant must agree with."""
        return {r[0]: (int(r[1]), int(r[2])) for r in
                self.db.execute("SELECT tenant, COUNT(*), MAX(id) FROM experiences GROUP BY tenant")}

    def vectors(self, tenant: str) -> tuple[list[int], Vectors]:
        ids, vecs = [], []
        for r in self.db.execute("SELECT id, vector FROM experiences WHERE tenant=? ORDER BY id", (tenant,)):
            ids.append(int(r[0]))
            vecs.append(np.frombuffer(r[1], dtype=np.float32))
        return ids, (np.vstack(vecs) if vecs else np.zeros((0, 0), dtype=np.float32))

    def list(self, tenant: str | None, limit: int, offset: int) -> list[Experience]:
        if tenant is None:
            rows = self.db.execute(f"SELECT {_COLS} FROM experiences ORDER BY id DESC LIMIT ? OFFSET ?",
                                   (limit, offset))
        else:
            rows = self.db.execute(f"SELECT {_COLS} FROM experiences WHERE tenant=? ORDER BY id DESC LIMIT ? "
                                   "OFFSET ?", (tenant, limit, offset))
        return [_row(r) for r in rows]

    def iter_all(self, tenant: str | None) -> Iterator[Experience]:
        q = f"SELECT {_COLS} FROM experiences" + (" WHERE tenant=?" if tenant else "") + " ORDER BY id"
        for r in self.db.execute(q, (tenant,) if tenant else ()):
            yield _row(r)

    def close(self) -> None:
        self.db.close()
