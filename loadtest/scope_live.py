"""``adapt.scope: near`` live: a measured cycle's adapter served through sharpen, the scope routing each question.

    .venv/bin/python loadtest/scope_live.py --registry RUN/adapt/adapters.sqlite3 --job JOB_DIR --report REPORT.json
        [--threshold 0.55] [--other 25] [--max-tokens 256] [--scratch /tmp/scope_live] [--out FILE.json]

Starts the default model on the embedded vLLM and sharpen in front of it with the run's registry
(its newest adapter active for the tenant ``default``, as ``adapt_bench --start-from`` does), the
adapter's scope written from the cycle's job folder (training and held-out questions, as the
service writes it), and ``adapt.scope: near``. Then greedy requests from the tenant, through
sharpen, with the trace on: the run's unseen items of its family (seed B), its unrelated items
(seed U) and ``--other`` items of four more families. Reported: who answered (the trace's
``adapter_scope``), accuracy, and per item whether the live score equals the one the run stored
for the model that answered (``adapt_bench``'s report: base before, adapter after), i.e. whether
``loadtest/adapter_scope.py``'s offline re-scoring is what the server does; and sharpen's own
time per request (``x-sharpen-overhead-ms``: the question's embedding included) for each side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.checkers import score  # noqa: E402
from evals.report import wilson  # noqa: E402
from loadtest.adapt_bench import SEED_B, SEED_U, backend, items, start_from  # noqa: E402
from loadtest.adapter_scope import scope_questions  # noqa: E402
from loadtest.machine import cpu_line  # noqa: E402

OTHER = ["gsm_symbolic", "spell_backward", "count_bits", "word_sorting"]


async def ask(proxy: str, model: str, its: list[Any], max_tokens: int) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=proxy, timeout=1800) as c:
        async def one(it: Any) -> dict[str, Any]:
            async with sem:
                body = {"model": model, "messages": [{"role": "user", "content": it.prompt()}],
                        "max_tokens": max_tokens, "temperature": 0.0, "trace": True}
                r = await c.post("/chat/completions", json=body)
                r.raise_for_status()
                d = r.json()
                scope = d["sharpen"]["trace"].get("adapter_scope") or {}
                return {"id": it.id, "model": d["model"], "answered_by": scope.get("answered_by"),
                        "similarity": scope.get("similarity"),
                        "overhead_ms": float(r.headers.get("x-sharpen-overhead-ms", "nan")),
                        "score": await score(it, str(d["choices"][0]["message"]["content"] or ""))}

        return list(await asyncio.gather(*(one(it) for it in its)))


def describe(label: str, rows: list[dict[str, Any]], stored: dict[str, dict[str, float]] | None) -> str:
    n, sent = len(rows), sum(1 for r in rows if r["answered_by"] == "adapter")
    k = sum(r["score"] for r in rows)
    lo, hi = wilson(k, n)
    out = f"| {label} | {sent}/{n} | {100 * k / n:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}) |"
    if stored is not None:
        same = sum(1 for r in rows if (r["score"] >= 0.5) == (
            stored["after" if r["answered_by"] == "adapter" else "before"][r["id"]] >= 0.5))
        out += f" {same}/{n} |"
    else:
        out += " |"
    for side in ("adapter", "base"):
        ms = [r["overhead_ms"] for r in rows if r["answered_by"] == side]
        out += f" {statistics.median(ms):.1f} |" if ms else " - |"
    return out


def prepare(a: argparse.Namespace) -> tuple[dict[str, Any], Path, str, int]:
    """The run's report, a data folder with its registry (newest adapter active) and the
    adapter's scope written; returns (report, data folder, adapter name, scope questions)."""
    from adapt.registry import AdapterRegistry
    from adapt.scope import AdapterScope
    from memory.embedder import MiniLMEmbedder

    report = json.loads(Path(a.report).read_text())
    data_dir = Path(a.scratch) / f"data-{int(time.time())}"
    start_from(Path(a.registry), data_dir)
    reg = AdapterRegistry(data_dir / "adapt" / "adapters.sqlite3")
    try:
        v = max(reg.versions(), key=lambda x: x.version)
        n_q = AdapterScope(MiniLMEmbedder(threads=2), reg, mode="near", threshold=a.threshold).write(
            Path(v.path), scope_questions([Path(d) for d in a.job.split("+")]))
    finally:
        reg.close()
    return report, data_dir, v.name, n_q


async def main(a: argparse.Namespace) -> dict[str, Any]:
    from tests.proxy_server import ProxyServer

    report, data_dir, name, n_q = await asyncio.to_thread(prepare, a)
    family, unrelated = report["args"]["family"], report["args"]["unrelated"]
    sets = {f"unseen {family}": (items(family, len(report["before"]["family"]), SEED_B), "family"),
            f"unrelated {unrelated}": (items(unrelated, len(report["before"]["unrelated"]), SEED_U), "unrelated")}
    for fam in OTHER:
        sets[fam] = (items(fam, a.other, 4242), None)
    out: dict[str, Any] = {"args": vars(a), "cpu": cpu_line(), "adapter": name, "scope_questions": n_q, "rows": {}}
    async with backend(a) as (url, base_path):
        proxy = await asyncio.to_thread(ProxyServer(url, data_dir=str(data_dir), memory={"enabled": False},
                                                    adapt={"enabled": True, "tenants": ["*"],
                                                           "base_model_path": base_path, "queue_trigger": 10**6,
                                                           "scope": "near", "scope_similarity": a.threshold}).start)
        try:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as c:
                base = next(m["id"] for m in (await c.get("/models")).json()["data"] if not m.get("parent"))
            for label, (its, _) in sets.items():
                t0 = time.perf_counter()
                out["rows"][label] = await ask(proxy.url, base, its, a.max_tokens)
                print(f"{label}: {len(its)} items in {time.perf_counter() - t0:.0f} s", flush=True)
        finally:
            await asyncio.to_thread(proxy.stop)
    lines = [f"CPU: {out['cpu']}", "", f"adapter {name}, scope of {n_q} questions, threshold {a.threshold}", "",
             "| items | sent to the adapter | accuracy, scoped | same right/wrong as the stored answer of the model "
             "that answered | sharpen ms p50, to the adapter | to the base |", "|---|---|---|---|---|---|"]
    for label, (_, key) in sets.items():
        stored = {"before": report["before"][key], "after": report["after"][key]} if key else None
        lines.append(describe(label, out["rows"][label], stored))
    out["table"] = "\n".join(lines)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", required=True)
    ap.add_argument("--job", required=True, help="the cycle's job folder(s), + between")
    ap.add_argument("--report", required=True)
    ap.add_argument("--threshold", type=float, default=0.55)
    ap.add_argument("--other", type=int, default=25)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--upstream", default=None)
    ap.add_argument("--base-model-path", default=None)
    ap.add_argument("--scratch", default="/tmp/scope_live")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = asyncio.run(main(args))
    print(result["table"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        args.out.with_suffix(".md").write_text(result["table"] + "\n")
