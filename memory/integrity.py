"""Start-up checks of the memory's two halves: SQLite (the truth) against the persisted FAISS
indexes and their manifest. Lost rows are reported; indexes that disagree are rebuilt."""

from __future__ import annotations

import logging
from typing import Any

from memory.index import IndexSet
from memory.store import ExperienceStore

log = logging.getLogger(__name__)


class MemoryUnavailable(RuntimeError):
    """The memory's database could not be opened (damaged, unreadable): memory calls fail at once
    with this instead of waiting for a store that will never be ready."""


def losses(truth: dict[str, tuple[int, int]], manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Tenants whose SQLite rows are fewer than the last persisted index recorded. Admin deletions
    persist the manifest at once and evictions only follow inserts, so fewer rows than recorded
    means acknowledged entries were lost (a damaged or missing WAL, a restored backup)."""
    lost: dict[str, dict[str, int]] = {}
    for tenant, entry in manifest.items():
        try:
            recorded = int(entry["count"])
        except (KeyError, TypeError, ValueError):
            continue  # an unreadable entry says nothing about what was there
        found = truth.get(tenant, (0, 0))[0]
        if found < recorded:
            lost[tenant] = {"recorded": recorded, "found": found}
    return lost


def repair(store: ExperienceStore, indexes: IndexSet) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Reports losses (an error log with the numbers) and makes every tenant's index agree with
    SQLite, rebuilding those that do not. Returns (losses, tenants rebuilt)."""
    truth = store.tenants()
    manifest = indexes.read_manifest()
    lost = losses(truth, manifest)
    if lost:
        log.error("memory: SQLite holds %d fewer entries than the persisted index recorded (%s); "
                  "acknowledged entries were lost", sum(v["recorded"] - v["found"] for v in lost.values()),
                  ", ".join(f"{t!r}: {v['recorded']} recorded, {v['found']} found" for t, v in lost.items()))
    repaired: list[str] = []
    for tenant, (count, max_id) in truth.items():
        entry = manifest.get(tenant)
        idx = indexes.load(tenant, entry) if entry else None
        # Ids only grow (AUTOINCREMENT), so an index holding no row newer than SQLite's newest
        # and as many rows as SQLite holds the same rows; its max_id may be higher (the newest
        # rows were deleted since), which is no reason to rebuild.
        if idx is None or idx.size != count or idx.max_id < max_id:
            ids, vecs = store.vectors(tenant)
            indexes.get(tenant).rebuild(ids, vecs)
            indexes.dirty.add(tenant)
            repaired.append(tenant)
    for tenant in set(manifest) - set(truth):
        indexes.drop(tenant)
    if indexes.dirty:
        indexes.persist()
    if repaired:
        log.warning("memory index rebuilt from SQLite for %d tenant(s)", len(repaired))
    return lost, repaired
