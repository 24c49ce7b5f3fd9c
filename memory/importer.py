"""Importing experiences all at once: every line is written in one SQLite transaction, or none
is. Exact duplicates (the same tenant, task and answer, already stored or repeated in the
import) are reported, not counted as imported; a near-duplicate task merges into the stored
entry as a live write does; an import that would take a tenant past its limit is refused whole
(a live write would evict, an import must not silently drop what it was given)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from memory.embedder import Vectors
from memory.index import IndexSet
from memory.store import Experience, ExperienceStore


class ImportRejected(ValueError):
    """The import as a whole cannot be applied; nothing was written."""


@dataclass
class ImportReport:
    """What an import did. ``duplicates``: 1-based positions of the exact duplicates skipped."""

    inserted: int = 0
    merged: int = 0
    duplicates: list[int] = field(default_factory=list)


def import_batch(store: ExperienceStore, indexes: IndexSet, lock: threading.Lock, items: list[Experience],
                 vecs: Vectors, *, dedup_similarity: float, max_entries: int) -> ImportReport:
    """Applies ``items`` (with their task vectors) atomically; updates the indexes after the commit."""
    report = ImportReport()
    seen: set[tuple[str, str]] = set()
    fresh: list[tuple[Experience, Vectors]] = []
    merges: list[tuple[int, Experience]] = []
    for pos, (exp, vec) in enumerate(zip(items, vecs, strict=True), 1):
        key = (exp.tenant, exp.digest())
        if key in seen or store.has_digest(*key):
            report.duplicates.append(pos)
            continue
        seen.add(key)
        with lock:
            idx = indexes.tenants.get(exp.tenant)
            near = idx.search(vec, 1) if idx is not None else []
        if near and near[0][1] >= dedup_similarity:
            merges.append((near[0][0], exp))
        else:
            fresh.append((exp, vec))
    held = store.tenants()
    for tenant, n in Counter(e.tenant for e, _ in fresh).items():
        total = held.get(tenant, (0, 0))[0] + n
        if total > max_entries:
            raise ImportRejected(f"tenant {tenant!r} would hold {total} entries, over the limit of {max_entries} "
                                 "per tenant; nothing was imported")
    with store.transaction():
        stored = [store.insert_one(exp, vec) for exp, vec in fresh]
        report.merged = sum(1 for id_, exp in merges if store.merge(id_, exp) is not None)
    report.inserted = len(stored)
    with lock:
        for row, (_, vec) in zip(stored, fresh, strict=True):
            idx = indexes.get(row.tenant)
            if row.id is not None and row.id > idx.max_id:
                idx.add([row.id], vec.reshape(1, -1))
            indexes.dirty.add(row.tenant)
    return report
