"""Experience memory at scale: recall latency with 100k entries for one tenant, and write throughput.

    .venv/bin/python loadtest/memory_bench.py [--entries 100000] [--queries 500] [--writes 2000]
        [--threads 1] [--dir /tmp/x] [--json out.json]

1. Builds the store fast: ``--entries`` rows for one tenant inserted through ``ExperienceStore``
   in large transactions, with clustered random unit vectors (topics plus noise: no embedding of
   100k texts needed), then the tenant's index built as HNSW (past the threshold) and persisted.
2. Starts ``MemoryService`` on that folder with the REAL all-MiniLM-L6-v2 embedder (it loads the
   persisted index without a rebuild) and times ``recall`` end to end (embedding + search + the
   SQLite lookup + the executor hops) on ``--queries`` questions; embedding alone and search
   alone are timed too. The same queries are then timed against an exact (flat) index.
3. Times the write path: ``remember`` futures acknowledged (embedded, deduplicated against the
   100k-entry HNSW index, committed with fsync) for ``--writes`` experiences queued at once.

The load average is printed with each phase: on a shared machine, rerun if it is high.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memory.embedder import MiniLMEmbedder  # noqa: E402
from memory.index import IndexSet, TenantIndex  # noqa: E402
from memory.service import MemoryConfig, MemoryService  # noqa: E402
from memory.store import Experience, ExperienceStore  # noqa: E402

TENANT = "bench"
DIM = 384
VERBS = ["reverse", "sort", "parse", "merge", "deduplicate", "validate", "serialize", "compress", "index", "cache",
         "paginate", "retry", "stream", "benchmark", "profile", "translate", "summarize", "encrypt", "hash", "plot"]
THINGS = ["a list of integers", "a CSV file", "JSON records", "a linked list", "HTTP responses", "log lines",
          "a binary tree", "user sessions", "time series", "an SQL table", "image thumbnails", "unicode strings",
          "a priority queue", "database rows", "sensor readings", "chat messages", "invoices", "graph edges"]
LANGS = ["Python", "Rust", "Go", "TypeScript", "Java", "C++", "SQL", "bash"]


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.1f} {b:.1f} {c:.1f} on {os.cpu_count()} CPUs"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def summary(xs_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in xs_s]
    return {"p50_ms": round(pct(ms, 50), 3), "p90_ms": round(pct(ms, 90), 3), "p99_ms": round(pct(ms, 99), 3),
            "max_ms": round(max(ms), 3), "mean_ms": round(statistics.fmean(ms), 3)}


def line(name: str, s: dict[str, float]) -> str:
    return (f"  {name:<28} p50 {s['p50_ms']:7.2f} ms   p90 {s['p90_ms']:7.2f}   p99 {s['p99_ms']:7.2f}   "
            f"max {s['max_ms']:7.2f}")


def questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"How do I {rng.choice(VERBS)} {rng.choice(THINGS)} in {rng.choice(LANGS)} "
            f"(case {rng.randrange(10_000)})?" for _ in range(n)]


def clustered_vectors(n: int, topics: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, DIM)).astype(np.float32)
    v = centres[rng.integers(0, topics, n)] + 0.8 * rng.standard_normal((n, DIM)).astype(np.float32)
    out: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def build(directory: Path, entries: int, threshold: int) -> dict[str, Any]:
    """The store and the persisted HNSW index, without the embedder."""
    out: dict[str, Any] = {}
    store = ExperienceStore(directory / "experiences.sqlite3")
    vecs = clustered_vectors(entries, topics=max(entries // 100, 1), seed=1)
    texts = questions(entries, seed=1)
    t = time.perf_counter()
    chunk = 10_000
    for lo in range(0, entries, chunk):
        store.insert([(Experience(tenant=TENANT, task=f"{texts[i]} #{i}", answer=f"answer {i}",
                                  score=0.5 + (i % 50) / 100, source="bench"), vecs[i])
                      for i in range(lo, min(lo + chunk, entries))])
    out["store_insert_s"] = round(time.perf_counter() - t, 2)
    ids, stored = store.vectors(TENANT)
    indexes = IndexSet(directory / "index", DIM, threshold)
    t = time.perf_counter()
    indexes.get(TENANT).rebuild(ids, stored)
    out["hnsw_build_s"] = round(time.perf_counter() - t, 2)
    assert indexes.tenants[TENANT].hnsw, "the threshold should make it HNSW"
    indexes.dirty.add(TENANT)
    t = time.perf_counter()
    indexes.persist()
    out["persist_s"] = round(time.perf_counter() - t, 2)
    out["index_bytes"] = (directory / "index" / IndexSet._file(TENANT)).stat().st_size
    store.close()
    return out


async def time_recall(m: MemoryService, qs: list[str]) -> list[float]:
    out = []
    for q in qs:
        t = time.perf_counter()
        await m.recall(TENANT, q, k=4, threshold=0.0)
        out.append(time.perf_counter() - t)
    return out


async def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"entries": args.entries, "queries": args.queries, "torch_threads": args.threads,
                           "cpus": os.cpu_count()}
    print(f"building {args.entries} entries ({load()})", flush=True)
    res["build"] = build(directory, args.entries, args.hnsw_threshold)
    print(f"  {res['build']}", flush=True)

    cfg = MemoryConfig(directory=directory, embedder="minilm", hnsw_threshold=args.hnsw_threshold,
                       max_entries_per_tenant=max(args.entries * 2, 10_000), persist_interval_s=3600)
    m = MemoryService(cfg, embedder=MiniLMEmbedder(threads=args.threads))
    t = time.perf_counter()
    await m.start()
    await m.wait_ready(600)
    # The service loads its embedder on first use (recall answers empty while it warms up):
    # load it before timing, or every recall measures an empty warm-up answer.
    await asyncio.get_running_loop().run_in_executor(None, m.embedder.load)
    res["service_ready_s"] = round(time.perf_counter() - t, 2)
    assert m.indexes is not None and m.store is not None
    assert not m.repaired, "the persisted index should load as is"
    idx = m.indexes.tenants[TENANT]
    assert idx.hnsw and idx.size == args.entries

    qs = questions(args.queries, seed=2)
    warm = questions(30, seed=3)
    await time_recall(m, warm)
    print(f"recall, HNSW ({load()})", flush=True)
    res["load_before_recall"] = os.getloadavg()[0]
    hnsw = await time_recall(m, qs)
    res["recall_hnsw"] = summary(hnsw)
    print(line("recall end to end (HNSW)", res["recall_hnsw"]), flush=True)

    # The parts, in this thread: embedding one query, and the search alone.
    emb = m.embedder
    # Thread CPU time too: on a loaded machine wall time is mostly waiting for a core, and CPU
    # time is what the same work costs on an idle one (torch runs on this thread: 1 thread).
    parts_e, parts_s, cpu_e, cpu_s = [], [], [], []
    vecs = []
    for q in qs:
        t, c = time.perf_counter(), time.thread_time()
        v = emb.embed([q])[0]
        parts_e.append(time.perf_counter() - t)
        cpu_e.append(time.thread_time() - c)
        vecs.append(v)
    for v in vecs:
        t, c = time.perf_counter(), time.thread_time()
        idx.search(v, 12)
        parts_s.append(time.perf_counter() - t)
        cpu_s.append(time.thread_time() - c)
    res["embed_only"] = summary(parts_e)
    res["embed_only_cpu"] = summary(cpu_e)
    res["search_only_hnsw"] = summary(parts_s)
    res["search_only_hnsw_cpu"] = summary(cpu_s)
    print(line("  embedding only (MiniLM)", res["embed_only"]), flush=True)
    print(line("    its thread CPU time", res["embed_only_cpu"]), flush=True)
    print(line("  search only (HNSW, k=12)", res["search_only_hnsw"]), flush=True)
    print(line("    its thread CPU time", res["search_only_hnsw_cpu"]), flush=True)

    # Exact search for comparison: the same data in a flat index.
    ids, stored = m.store.vectors(TENANT)
    flat = TenantIndex(DIM, hnsw_threshold=10**9)
    flat.rebuild(ids, stored)
    parts_f = []
    agree = 0
    for v in vecs:
        t = time.perf_counter()
        exact = flat.search(v, 4)
        parts_f.append(time.perf_counter() - t)
        approx = idx.search(v, 4)
        agree += len({i for i, _ in exact} & {i for i, _ in approx})
    res["search_only_flat"] = summary(parts_f)
    res["hnsw_recall_at_4"] = round(agree / (4 * len(vecs)), 4)
    print(line("  search only (flat, k=4)", res["search_only_flat"]), flush=True)
    with m._lock:
        m.indexes.tenants[TENANT] = flat
    print(f"recall, flat ({load()})", flush=True)
    res["recall_flat"] = summary(await time_recall(m, qs))
    print(line("recall end to end (flat)", res["recall_flat"]), flush=True)
    with m._lock:
        m.indexes.tenants[TENANT] = idx
    print(f"  HNSW recall@4 vs exact: {res['hnsw_recall_at_4']:.3f} (efSearch 64; synthetic clustered random vectors, "
          "a harder case than real embeddings)", flush=True)
    # What a larger efSearch would cost and buy (the service uses 64).
    exact_sets = [{i for i, _ in flat.search(v, 4)} for v in vecs]
    base: Any = faiss.downcast_index(idx.index.index)
    res["ef_sweep"] = {}
    for ef in (64, 128, 256):
        base.hnsw.efSearch = ef
        took, hit = [], 0
        for v, ex in zip(vecs, exact_sets, strict=True):
            t = time.perf_counter()
            got = idx.search(v, 4)
            took.append(time.perf_counter() - t)
            hit += len(ex & {i for i, _ in got})
        res["ef_sweep"][ef] = {"recall_at_4": round(hit / (4 * len(vecs)), 4), **summary(took)}
        print(f"    efSearch {ef:>3}: recall@4 {hit / (4 * len(vecs)):.3f}, search p50 "
              f"{res['ef_sweep'][ef]['p50_ms']:.2f} ms, p99 {res['ef_sweep'][ef]['p99_ms']:.2f} ms", flush=True)
    base.hnsw.efSearch = 64

    # Recalls while the index is persisted (the write thread rewrites the whole tenant file).
    m.indexes.dirty.add(TENANT)
    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    persisting = loop.run_in_executor(m._write_pool, m._persist)
    during = []
    while not persisting.done():
        during += await time_recall(m, qs[: 5])
    await persisting
    res["persist_s"] = round(time.perf_counter() - t, 2)
    res["recall_during_persist"] = summary(during) if during else None
    if during:
        print(line(f"recall during a {res['persist_s']:.1f} s persist", res["recall_during_persist"]), flush=True)

    # The write path: queued at once, acknowledged once committed (embedded in batches).
    print(f"writes ({load()})", flush=True)
    texts = questions(args.writes, seed=4)
    t0 = time.perf_counter()
    acks: list[float] = []

    def acked(_: object) -> None:
        acks.append(time.perf_counter() - t0)

    futs = []
    for i, q in enumerate(texts):
        f = m.remember(Experience(tenant=TENANT, task=f"{q} write {i}", answer=f"written {i}", score=0.8))
        f.add_done_callback(acked)
        futs.append(f)
    rows = await asyncio.gather(*futs)
    wall = time.perf_counter() - t0
    res["writes"] = {"n": args.writes, "wall_s": round(wall, 3), "per_s": round(args.writes / wall, 1),
                     "stored": sum(r is not None for r in rows), "dropped": m.dropped,
                     "ack_latency": summary(acks), "batch_size": cfg.batch_size}
    ack = res["writes"]["ack_latency"]
    print(f"  {args.writes} remembered in {wall:.2f} s: {args.writes / wall:.0f}/s (batches of up to "
          f"{cfg.batch_size}, fsync per batch); ack p50 {ack['p50_ms']:.0f} ms, p99 {ack['p99_ms']:.0f} ms", flush=True)
    # Single writes, one at a time: the latency of one acknowledgement.
    single = []
    for i, q in enumerate(questions(50, seed=5)):
        t = time.perf_counter()
        await m.remember(Experience(tenant=TENANT, task=f"{q} single {i}", answer="s", score=0.8))
        single.append(time.perf_counter() - t)
    res["single_write"] = summary(single)
    print(line("one write, acknowledged", res["single_write"]), flush=True)
    t = time.perf_counter()
    await m.stop()
    res["stop_persist_s"] = round(time.perf_counter() - t, 2)
    res["load_after"] = os.getloadavg()[0]
    print(f"done ({load()})", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the embedder (the service's default: 1)")
    ap.add_argument("--hnsw-threshold", type=int, default=20_000)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="memory-bench-"))
    try:
        res = asyncio.run(run(args, directory))
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    target = res["recall_hnsw"]["p99_ms"] <= 15.0
    print(f"recall p99 {res['recall_hnsw']['p99_ms']:.2f} ms with {args.entries} entries: "
          f"{'within' if target else 'OVER'} the 15 ms target")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
