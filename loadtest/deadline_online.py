"""best_of_n's ``program_deadline`` online: wall time against one ``n=8`` call, and accuracy, paired
by item, through sharpen on the embedded vLLM, one request at a time.

    .venv/bin/python loadtest/deadline_online.py [--tasks family_relationships,spell_backward]
        [--per-task 20] [--deadline 2] [--out FILE.jsonl] [--md FILE.md]

Per reasoning-gym item (the REPORT seed of ``selection_bench.py``; the eval's prompt and
``max_tokens``), in turn: ``self_consistency`` (its default is one ``n=8`` call: the reference),
``best_of_n`` as shipped, and ``best_of_n`` with ``program_deadline``. One line per run in
``--out`` (resumable); the table gives accuracy with Wilson intervals, the deadline's paired
changes against the shipped best_of_n, and wall time against the reference (median / largest).
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

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.report import wilson  # noqa: E402
from loadtest.machine import cpu_line  # noqa: E402
from loadtest.selection_bench import load_items, upstream_for  # noqa: E402
from loadtest.selection_online import run_one  # noqa: E402


def table(rows: list[dict[str, Any]], deadline_name: str) -> str:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["strategy"], {})[r["key"]] = r
    ref, base, dl = by.get("self_consistency", {}), by.get("best_of_n", {}), by.get(deadline_name, {})
    keys = [k for k in ref if k in base and k in dl]
    out = [f"{len(keys)} items with all three runs; CPU: {cpu_line()}", "",
           "| task | items | SC n=8 | best_of_n | with deadline | paired (deadline vs shipped) | cut | "
           "wall / n=8: shipped median, largest | with deadline: median, largest |",
           "|---|---:|---|---|---|---|---:|---|---|"]
    for task in sorted({ref[k]["task"] for k in keys}):
        ks = [k for k in keys if ref[k]["task"] == task]

        def acc(d: dict[str, dict[str, Any]], ks: list[str] = ks) -> str:
            n, k = len(ks), sum(d[x]["correct"] for x in ks)
            lo, hi = wilson(k, n)
            return f"{k / n:.0%} ({lo:.0%}-{hi:.0%})"

        up = sum(dl[k]["correct"] > base[k]["correct"] for k in ks)
        down = sum(dl[k]["correct"] < base[k]["correct"] for k in ks)
        r_base = [base[k]["seconds"] / ref[k]["seconds"] for k in ks]
        r_dl = [dl[k]["seconds"] / ref[k]["seconds"] for k in ks]
        cut = sum(bool(dl[k].get("cut")) for k in ks)
        out.append(f"| {task} | {len(ks)} | {acc(ref)} | {acc(base)} | {acc(dl)} | +{up}/-{down} | {cut} | "
                   f"{statistics.median(r_base):.2f}x, {max(r_base):.2f}x | "
                   f"{statistics.median(r_dl):.2f}x, {max(r_dl):.2f}x |")
    return "\n".join(out) + "\n"


def done_runs(path: Path) -> set[tuple[str, str]]:
    if not path.exists():
        return set()
    return {(r["strategy"], r["key"]) for r in map(json.loads, path.read_text().splitlines())}


async def run(args: argparse.Namespace, deadline_name: str, have: set[tuple[str, str]]) -> None:
    from tests.proxy_server import ProxyServer

    items = load_items("report", args.tasks.split(","), args.per_task)
    out_path = Path(args.out)
    strategies = ["self_consistency", "best_of_n", deadline_name]
    todo = [(s, it) for it in items for s in strategies if (s, it.key) not in have]
    print(f"CPU: {cpu_line()}\n{len(items)} items, {len(todo)} runs to do", flush=True)
    async with upstream_for(args) as upstream, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        async with s.get(upstream + "/models") as r:
            model = str(next(c["id"] for c in (await r.json())["data"] if not c.get("parent")))
        proxy = await asyncio.to_thread(ProxyServer(upstream, memory={"enabled": False}).start)
        t0 = time.monotonic()
        try:
            with out_path.open("a") as f:  # noqa: ASYNC230 (one small append per run)
                for strategy, item in todo:
                    if time.monotonic() - t0 > args.budget_s:
                        print("time budget spent", flush=True)
                        break
                    rec = await run_one(s, proxy.url, model, strategy, item, args)
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    print(f"  {strategy} {item.key}: {rec['correct']} ({rec['seconds']:.1f} s)"
                          f"{' cut' if rec.get('cut') else ''}", flush=True)
        finally:
            await asyncio.to_thread(proxy.stop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="family_relationships,spell_backward")
    ap.add_argument("--per-task", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=2.0)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--upstream")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--max-tokens", type=int, default=352)
    ap.add_argument("--budget-s", type=float, default=1800, help="no new run starts after this many seconds")
    ap.add_argument("--scratch", default="/tmp/deadline_online")
    ap.add_argument("--out", default="/tmp/deadline_online/runs.jsonl")
    ap.add_argument("--md", help="write the table here too")
    ap.add_argument("--report-only", action="store_true", help="only print the table of --out")
    args = ap.parse_args()
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    name = f"best_of_n+deadline={args.deadline:g}"
    if not args.report_only:
        asyncio.run(run(args, name, done_runs(Path(args.out))))
    rows = [json.loads(x) for x in Path(args.out).read_text().splitlines()]
    md = table(rows, name)
    print(md)
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
