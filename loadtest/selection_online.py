"""Online check of the offline re-score: the shipped strategies, run through sharpen on the real
model, on items of the REPORT set whose candidates ``selection_bench.py`` stored.

    .venv/bin/python loadtest/selection_bench.py --online 40 [--online-strategies best_of_n,self_consistency]

Starts vLLM (the project's backend code) and sharpen in-process in front of it
(``tests.proxy_server.ProxyServer``), sends the first ``--online`` report items already in the
generation file to each strategy with its DEFAULT options (the eval's prompt, ``max_tokens`` as
the generation pass), and appends one line per (strategy, item) to ``--online-out``: answer,
right or wrong, usage, upstream calls, waves. Resumable; bounded by ``--chunk-s`` like the
generation. ``--rescore --online-out FILE`` then compares, on the same items, the online
accuracy and tokens with the offline re-score of the same default (fresh samples: the two agree
in expectation, so the comparison is of accuracies with intervals, not item by item).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.selection_bench import INSTRUCTION, Item, upstream_for
from strategies.answers import extract


def recipe(strategy: str) -> dict[str, Any]:
    """The strategy object sent for a name: a shipped strategy with its defaults, or a named recipe
    of options (``self_consistency+early``: ``strategies.self_consistency.EARLY_STOPPING``;
    ``best_of_n+deadline=K``: ``program_deadline`` K)."""
    from strategies.self_consistency import EARLY_STOPPING

    if strategy == "self_consistency+early":
        return {"name": "self_consistency", **EARLY_STOPPING}
    if strategy.startswith("best_of_n+deadline="):
        return {"name": "best_of_n", "program_deadline": float(strategy.split("=", 1)[1])}
    return {"name": strategy}


def _targets(args: argparse.Namespace) -> list[Any]:
    """The first ``--online`` report items whose candidates the generation file stored, taken
    from each task in turn (so a few cover every family)."""
    from loadtest.selection_rescore import _dataset, load

    by_task: dict[str, list[Any]] = {}
    for r in load(args.gen.split(",")):
        if r.set == "report":
            ds = _dataset(r.set, r.task, 200)
            e = ds[int(r.raw["idx"])]
            by_task.setdefault(r.task, []).append(
                Item(r.set, r.task, int(r.raw["idx"]), str(e["question"]), str(e["answer"]), e, ds))
    queues = [sorted(v, key=lambda it: it.idx) for v in by_task.values()]
    items = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return items[: args.online]


async def run_one(session: aiohttp.ClientSession, url: str, model: str, strategy: str, item: Any,
               args: argparse.Namespace) -> dict[str, Any]:
    body = {"model": model, "max_tokens": args.max_tokens, "trace": True, "strategy": recipe(strategy),
            "messages": [{"role": "user", "content": item.question + INSTRUCTION}]}
    t0 = time.perf_counter()
    async with session.post(url + "/chat/completions", json=body) as r:
        data: dict[str, Any] = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {str(data)[:300]}")
    text = str(data["choices"][0]["message"].get("content") or "")
    trace = (data.get("sharpen") or {}).get("trace") or {}
    answer = extract(text)
    return {"strategy": strategy, "key": item.key, "task": item.task, "answer": answer, "correct": item.score(answer),
            "usage": data.get("usage"), "calls": len(trace.get("calls") or []), "waves": trace.get("waves"),
            "cut": any("program deadline" in n for n in trace.get("notes") or []),
            "seconds": round(time.perf_counter() - t0, 2)}


def _have(path: Path) -> set[tuple[str, str]]:
    have = set()
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                r = json.loads(line)
                have.add((r["strategy"], r["key"]))
    return have


async def online(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    from tests.proxy_server import ProxyServer

    items = _targets(args)
    out_path = Path(args.online_out)
    have = _have(out_path)
    # item by item, every strategy on it in turn (a stopped run leaves whole items)
    todo = [(s, it) for it in items for s in args.online_strategies.split(",") if (s, it.key) not in have]
    print(f"online: {len(items)} items, {len(todo)} runs to do", flush=True)
    if not todo:
        return 0
    finished = 0
    async with upstream_for(args) as upstream, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        async with s.get(upstream + "/models") as r:
            model = str(next(c["id"] for c in (await r.json())["data"] if not c.get("parent")))
        proxy = await asyncio.to_thread(ProxyServer(upstream, memory={"enabled": False}).start)
        try:
            with out_path.open("a") as out:  # noqa: ASYNC230 (one small append per run)

                async def worker() -> None:
                    nonlocal finished
                    while todo and time.monotonic() - t_start < args.chunk_s:
                        strategy, item = todo.pop(0)
                        try:
                            rec = await run_one(s, proxy.url, model, strategy, item, args)
                        except Exception as exc:
                            print(f"  {strategy} {item.key}: {exc!r}"[:300], flush=True)
                            continue
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        finished += 1
                        print(f"  {strategy} {item.key}: {rec['correct']} ({rec['seconds']:.0f} s)", flush=True)

                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.concurrency))),
                                           timeout=max(1.0, args.chunk_s + args.drain_s - (time.monotonic() - t_start)))
        finally:
            await asyncio.to_thread(proxy.stop)
    left = len(todo)
    print(f"online chunk: {finished} runs in {time.monotonic() - t_start:.0f} s; {left} left", flush=True)
    return 3 if left else 0
