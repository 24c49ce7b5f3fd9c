"""One consensus self-training cycle on a reasoning-gym family (or a JSONL set), measured on unseen items.

    .venv/bin/python loadtest/adapt_bench.py [--family basic_arithmetic] [--unrelated letter_counting]
        [--queries 32] [--eval 150] [--eval-unrelated 100] [--sc-items 50] [--canary-items 16]
        [--mode ttrl|ttsi] [--label-n 8] [--label-vote programs|pooled] [--min-share 0.5] [--rationales 2]
        [--max-steps 40] [--learning-rate 5e-4] [--before FILE.json] [--adapter DIR]
        [--upstream URL --base-model-path DIR] [--scratch /tmp/adapt_bench] [--out FILE.json]

Starts the model on the embedded vLLM (runtime LoRA) unless ``--upstream`` names a running one,
and sharpen itself in front of it (``tests.proxy_server.ProxyServer``, adaptation on for every
tenant, cycles started by hand). Then:

1. Before (skipped with ``--before``, a previous run's JSON for the same items): greedy accuracy
   of the base model on ``--eval`` unseen items of the family (seed B) and ``--eval-unrelated``
   items of an unrelated family (regression check), and self-consistency@8 on the first
   ``--sc-items`` of the unseen ones (the accuracy the vote reaches, which the adapter chases).
2. Live traffic: ``--queries`` items of the family (seed A) through sharpen with
   ``self_consistency`` n=4 (or ``--live-strategy``: its candidates are what the labeller
   reuses); those whose vote was split (uncertainty >= 0.25) are queued.
3. One cycle through the admin API: consensus labels (one n=``--label-n`` call per query),
   clear majorities kept, agreeing rationales easy-to-hard, LoRA in its own process, the gate
   (pseudo-labelled held-out split + a canary of ``--canary-items`` gold items, seed C), swap.
   Phases timed from the job's own ``phases_s``; the total compared with 10 minutes.
4. After: greedy accuracy of the adapter on the same items as 1 (loaded under a scratch name if
   the gate rejected it), with 95% Wilson intervals and an exact paired McNemar test.

``--adapter DIR`` skips 2 and 3 and measures an adapter trained elsewhere (for example a
cycle's ``train.jsonl`` retrained with ``python -m adapt.train_worker``) the same way.

``--cycles N`` runs N cycles in one service (each on its own live queries: the next seed of a
reasoning-gym family, the next rows of a JSONL set), so what the service keeps between cycles
(the canary's known answers) counts in the later cycles' times; the last cycle's adapter is
measured. ``--unseen-from`` moves a short JSONL set's unseen block (row 128 by default).

A second cycle in a new process: ``--start-from`` an earlier run's ``adapt/adapters.sqlite3`` (its newest adapter
becomes the current one: it serves the live queries and the gate compares against it),
``--queries-seed`` another seed for new live queries, and ``--train-from current`` to start the
cycle's adapter from it (``adapt.train_from``); ``loadtest/retrain_variants.py`` retrains the same
data the other ways.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.checkers import score  # noqa: E402
from evals.datasets import Item, load  # noqa: E402
from evals.report import mcnemar, wilson  # noqa: E402
from loadtest.machine import cpu_line  # noqa: E402
from strategies.answers import extract  # noqa: E402

TARGET_S = 600.0
SEED_A, SEED_B, SEED_C, SEED_U = 101, 202, 303, 404
LIVE = {"name": "self_consistency", "n": 4}  # what the live queries ask for unless --live-strategy says
FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 4, "min_digits": 2, "max_digits": 2},
}


# A JSONL set from outside the project (--family path.jsonl): disjoint blocks of its rows by role
# (the unseen block starts at --unseen-from, 128 unless a short set needs it earlier)
_BLOCK = {SEED_A: 0, SEED_C: 64}
LIVE_ROWS = _BLOCK[SEED_C]  # the live queries of every cycle come before the canary


def items(family: str, n: int, seed: int, *, cycle: int = 0, unseen_from: int = 128) -> list[Item]:
    """``n`` items of a reasoning-gym family for ``seed`` (cycle ``c``'s live queries: seed + c),
    or rows of a JSONL set (``_from_file``)."""
    if family.endswith(".jsonl"):
        return _from_file(Path(family), n, seed, cycle, unseen_from)
    import reasoning_gym

    seed += cycle
    ds = reasoning_gym.create_dataset(family, seed=seed, size=n, **FAMILY_CONFIG.get(family, {}))
    return [Item(id=f"{family}-{seed}-{i}", question=str(ds[i]["question"]), answer=str(ds[i]["answer"]),
                 checker="reasoning_gym", entry=ds[i], dataset=ds) for i in range(n)]


def _from_file(path: Path, n: int, seed: int, cycle: int, unseen_from: int) -> list[Item]:
    """Rows of a question/answer JSONL the project does not contain (e.g. GSM8K's test split via
    ``loadtest/heldout.py build``) in the file's order: live queries (seed A; cycle c's from row
    c x n) within rows 0-63, canary (seed C) from row 64, unseen evaluation (seed B) from row
    ``unseen_from``: never overlapping."""
    start = unseen_from if seed == SEED_B else _BLOCK.get(seed)
    if start is not None and seed == SEED_A:
        start += cycle * n
    got = load(str(path))[start:start + n] if start is not None else []
    end = {SEED_A: LIVE_ROWS, SEED_C: unseen_from}.get(seed)
    # each block ends where the next begins; the unseen block must not start among the live rows
    overlaps = start is not None and (start + n > end if end is not None else start < LIVE_ROWS)
    if len(got) < n or overlaps:
        raise SystemExit(f"{path}: {n} rows from row {start} do not fit (the live queries of all cycles within "
                         f"rows 0-{LIVE_ROWS - 1}, the canary from row 64 before the unseen block at row "
                         f"{unseen_from}; --unrelated must be a reasoning-gym family)")
    return got


async def greedy(client: httpx.AsyncClient, model: str, its: list[Item], max_tokens: int,
                 concurrency: int = 8) -> dict[str, float]:
    """item id -> score (0/1), greedy, directly against vLLM."""
    sem = asyncio.Semaphore(concurrency)

    async def one(it: Item) -> tuple[str, float]:
        async with sem:
            body = {"model": model, "messages": [{"role": "user", "content": it.prompt()}], "max_tokens": max_tokens,
                    "temperature": 0.0}
            r = await client.post("/chat/completions", json=body, timeout=1800)
            r.raise_for_status()
            return it.id, await score(it, str(r.json()["choices"][0]["message"]["content"] or ""))

    return dict(await asyncio.gather(*(one(it) for it in its)))


async def self_consistency(client: httpx.AsyncClient, model: str, its: list[Item], n: int, max_tokens: int,
                           concurrency: int = 2) -> dict[str, float]:
    """item id -> score of the majority answer over n samples (one n=N call)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(it: Item) -> tuple[str, float]:
        async with sem:
            body = {"model": model, "messages": [{"role": "user", "content": it.prompt()}], "max_tokens": max_tokens,
                    "temperature": 0.8, "n": n}
            r = await client.post("/chat/completions", json=body, timeout=1800)
            r.raise_for_status()
            answers = [extract(c["message"]["content"] or "") for c in r.json()["choices"]]
            votes = Counter(a for a in answers if a is not None)
            if not votes:
                return it.id, 0.0
            return it.id, await score(it, f"The answer is {votes.most_common(1)[0][0]}.")

    return dict(await asyncio.gather(*(one(it) for it in its)))


def summary(scores: dict[str, float], base: dict[str, float] | None = None) -> dict[str, Any]:
    k, n = sum(scores.values()), len(scores)
    lo, hi = wilson(k, n)
    out: dict[str, Any] = {"right": k, "n": n, "accuracy": k / n if n else 0.0, "ci95": [lo, hi]}
    if base is not None:
        out["vs_base"] = mcnemar(base, scores)
    return out


@contextlib.asynccontextmanager
async def backend(args: argparse.Namespace) -> AsyncIterator[tuple[str, str]]:
    """(upstream base URL, base model's HF folder)."""
    if args.upstream:
        yield args.upstream.rstrip("/"), args.base_model_path
        return
    from server.backend.vllm_process import VLLMProcess
    from server.backend.weights import prepare_model
    from server.settings import BackendSettings, Settings

    t0 = time.perf_counter()
    prepared = await asyncio.to_thread(prepare_model, args.model, Settings().cache_dir, python=sys.executable)
    settings = BackendSettings(model=args.model, kv_cache_gib=args.kv_cache_gib, max_lora_rank=8, max_loras=2,
                               start_timeout=900)
    log_path = Path(args.scratch) / f"vllm-{prepared.served_name}.log"
    async with VLLMProcess(settings, prepared, log_path, python=sys.executable) as proc:
        print(f"vLLM ready at {proc.base_url} in {time.perf_counter() - t0:.0f} s (log {log_path})", flush=True)
        yield proc.base_url, str(prepared.path)


def adapt_config(args: argparse.Namespace, base_path: str, canary: Path | None) -> dict[str, Any]:
    return {"enabled": True, "tenants": ["*"], "base_model_path": base_path, "queue_trigger": 10**6,
            "uncertainty_threshold": 0.25, "dedup_similarity": 0.97, "max_queries": args.queries,
            "labeller": "consensus", "mode": args.mode, "siblings": args.siblings, "label_n": args.label_n,
            "label_rationalize": args.rationalize, "label_vote": args.label_vote,
            "label_max_tokens": args.max_tokens, "gate_max_tokens": args.max_tokens, "min_share": args.min_share,
            "rationales": args.rationales, "max_steps": args.max_steps, "epochs": args.epochs,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "threads": args.threads,
            "train_dtype": args.train_dtype,
            "gate_margin": args.gate_margin, "canary": str(canary) if canary else None,
            "label_early_stop": args.early_stop, "label_concurrency": args.label_concurrency,
            "gate_samples": args.gate_samples, "train_from": args.train_from, "label_traces": args.traces}


async def live_traffic(proxy: str, base: str, its: list[Item], max_tokens: int,
                       strategy: dict[str, Any]) -> dict[str, Any]:
    """The seed-A queries as users would send them, through sharpen with ``strategy``."""
    async with httpx.AsyncClient(base_url=proxy, timeout=1800) as c:
        sem = asyncio.Semaphore(2)

        async def one(it: Item) -> float | None:
            async with sem:
                body = {"model": base, "messages": [{"role": "user", "content": it.prompt()}],
                        "max_tokens": max_tokens, "strategy": strategy}
                r = await c.post("/chat/completions", json=body)
                r.raise_for_status()
                u = (r.json().get("sharpen") or {}).get("uncertainty")
                return float(u) if u is not None else None

        us = await asyncio.gather(*(one(it) for it in its))
    return {"sent": len(its), "strategy": strategy, "uncertainties": us}


async def cycle(proxy_root: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=proxy_root, timeout=60) as c:
        r = await c.post("/admin/adaptation/run", json={"tenant": "default"})
        r.raise_for_status()
        job_id = r.json()["id"]
        t0, last, step = time.perf_counter(), None, None
        while True:
            job = (await c.get(f"/admin/adaptation/jobs/{job_id}")).json()
            if job["stage"] != last:
                last = job["stage"]
                print(f"  [{time.perf_counter() - t0:6.1f} s] stage {last}", flush=True)
            prog = job.get("train") or {}
            if job["stage"] == "train" and prog.get("step") and prog["step"] != step:
                step = prog["step"]
                print(f"  [{time.perf_counter() - t0:6.1f} s]   step {step}/{prog.get('total_steps')} "
                      f"loss {prog.get('loss')}", flush=True)
            if job.get("finished"):
                job["wall_s"] = round(time.perf_counter() - t0, 1)
                return dict(job)
            await asyncio.sleep(1.0)


def prepare(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any] | None]:
    """The scratch folder, the canary file (gold items of the family, seed C) and a reused "before"."""
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    canary = None
    if args.canary_items:
        canary = scratch / "canary.jsonl"
        canary.write_text("".join(json.dumps({"question": it.prompt(), "answer": it.answer}) + "\n"
                                  for it in items(args.family, args.canary_items, SEED_C,
                                                 unseen_from=args.unseen_from)))
    before = json.loads(Path(args.before).read_text())["before"] if args.before else None
    return canary, before


def start_from(registry: Path, data_dir: Path) -> None:
    """An earlier run's adapter registry, its newest version active: that adapter serves the live
    queries and is the current one the cycle's adapter replaces (and, with --train-from current,
    starts from)."""
    from adapt.registry import AdapterRegistry

    (data_dir / "adapt").mkdir(parents=True)
    db = data_dir / "adapt" / "adapters.sqlite3"
    db.write_bytes(registry.read_bytes())
    reg = AdapterRegistry(db)
    try:
        reg.update(max(reg.versions(), key=lambda v: v.version).name, status="active")
    finally:
        reg.close()


async def measure_before(vllm: httpx.AsyncClient, base: str, args: argparse.Namespace, unseen: list[Item],
                         unrelated: list[Item]) -> dict[str, Any]:
    t0 = time.perf_counter()
    print(f"before: greedy on {len(unseen)} + {len(unrelated)} items ...", flush=True)
    b = {"family": await greedy(vllm, base, unseen, args.max_tokens),
         "unrelated": await greedy(vllm, base, unrelated, args.max_tokens)}
    print(f"  greedy family {summary(b['family'])['accuracy']:.3f}, unrelated "
          f"{summary(b['unrelated'])['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.sc_items:
        b["sc8_family"] = await self_consistency(vllm, base, unseen[: args.sc_items], 8, args.max_tokens)
        print(f"  SC@8 family {summary(b['sc8_family'])['accuracy']:.3f} on {args.sc_items} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return b


async def adapt_and_measure(vllm: httpx.AsyncClient, proxy_root: str, base: str, args: argparse.Namespace,
                            seen: list[list[Item]], unseen: list[Item], unrelated: list[Item]) -> dict[str, Any]:
    """Steps 2 and 3 once per cycle (``seen[c]``: cycle c's live queries), one service throughout
    (what it remembers between cycles, such as the canary's known answers, is kept); then step 4
    for the last cycle's adapter. Earlier cycles go to ``earlier_cycles``."""
    runs: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=proxy_root, timeout=60) as admin:
        for c, queries in enumerate(seen):
            out: dict[str, Any] = {}
            runs.append(out)
            t0 = time.perf_counter()
            out["live"] = await live_traffic(proxy_root + "/v1", base, queries, args.max_tokens,
                                             json.loads(args.live_strategy))
            await asyncio.sleep(2.0)  # the adaptation service queues from the event stream
            status = (await admin.get("/admin/adaptation")).json()
            out["live"].update(queued=status["queue"].get("default", 0), seconds=round(time.perf_counter() - t0))
            print(f"cycle {c + 1}, live: {len(queries)} queries, {out['live']['queued']} queued "
                  f"({out['live']['seconds']} s)", flush=True)
            job = await cycle(proxy_root)
            out["cycle"] = job
            print(f"cycle {c + 1}: {job['status']} {job.get('error') or ''} {json.dumps(job.get('report'))}",
                  flush=True)
        out = runs[-1]
        if len(runs) > 1:
            out["earlier_cycles"] = runs[:-1]
        job = out["cycle"]
        if not job.get("adapter") or job["status"] not in ("succeeded", "rejected"):
            return out
        name = job["adapter"]
        if job["status"] == "rejected":  # unloaded by the gate: load it again to measure it
            adapters = (await admin.get("/admin/adapters")).json()["data"]
            path = next(a["path"] for a in adapters if a["name"] == name)
            name = f"{name}-eval"
            (await vllm.post("/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                             timeout=300)).raise_for_status()
    return out | await measure_after(vllm, name, args, unseen, unrelated)


async def measure_after(vllm: httpx.AsyncClient, name: str, args: argparse.Namespace, unseen: list[Item],
                        unrelated: list[Item]) -> dict[str, Any]:
    """Step 4: greedy accuracy of the adapter served as ``name`` on the items of step 1."""
    t0 = time.perf_counter()
    after = {"family": await greedy(vllm, name, unseen, args.max_tokens),
             "unrelated": await greedy(vllm, name, unrelated, args.max_tokens)}
    print(f"after ({time.perf_counter() - t0:.0f} s): family {summary(after['family'])['accuracy']:.3f}, "
          f"unrelated {summary(after['unrelated'])['accuracy']:.3f}", flush=True)
    return {"after": after, "after_model": name}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from tests.proxy_server import ProxyServer

    canary, before = await asyncio.to_thread(prepare, args)
    report: dict[str, Any] = {"args": vars(args), "cpu": cpu_line(), "load_avg_start": os.getloadavg()}
    seen = [items(args.family, args.queries, args.queries_seed, cycle=c) for c in range(args.cycles)]
    unseen = items(args.family, args.eval, SEED_B, unseen_from=args.unseen_from)
    unrelated = items(args.unrelated, args.eval_unrelated, SEED_U)
    async with backend(args) as (url, base_path), httpx.AsyncClient(base_url=url, timeout=1800) as vllm:
        base = next(str(m["id"]) for m in (await vllm.get("/models")).json()["data"] if not m.get("parent"))
        report["base"] = base
        report["before"] = before or await measure_before(vllm, base, args, unseen, unrelated)
        if args.before_only:
            report["load_avg_end"] = os.getloadavg()
            return report
        if args.adapter:  # trained elsewhere: load it and go straight to step 4
            (await vllm.post("/load_lora_adapter", json={"lora_name": "adapter-eval", "lora_path": args.adapter},
                             timeout=300)).raise_for_status()
            report |= await measure_after(vllm, "adapter-eval", args, unseen, unrelated)
            report["load_avg_end"] = os.getloadavg()
            return report
        data_dir = Path(args.scratch) / f"data-{int(time.time())}"
        if args.start_from:
            await asyncio.to_thread(start_from, Path(args.start_from), data_dir)
        proxy = await asyncio.to_thread(ProxyServer(url, data_dir=str(data_dir),
                                                    memory={"enabled": False},
                                                    adapt=adapt_config(args, base_path, canary)).start)
        try:
            report |= await adapt_and_measure(vllm, proxy.root, base, args, seen, unseen, unrelated)
        finally:
            await asyncio.to_thread(proxy.stop)
    report["load_avg_end"] = os.getloadavg()
    return report


def render(r: dict[str, Any]) -> str:
    a = r["args"]
    family = Path(a["family"]).name  # a JSONL set by its file name, not this machine's path
    lines = [f"\n## Consensus self-training: {r.get('base')}, {family} (unrelated: {a['unrelated']})",
             f"CPU: {r['cpu']}; load average {r['load_avg_start'][0]:.1f} at start, "
             f"{r.get('load_avg_end', [0])[0]:.1f} at end (the machine is shared)\n"]
    b, af = r["before"], r.get("after")
    many = len(r.get("earlier_cycles", [])) + 1
    after = "after one cycle" if many == 1 else f"after {many} cycles"
    lines += [f"| measure | base | {after} | paired (McNemar) |", "|---|---|---|---|"]
    for key, label in (("family", f"greedy, {a['eval']} unseen {family}"),
                       ("unrelated", f"greedy, {a['eval_unrelated']} {a['unrelated']}")):
        sb = summary(b[key])
        cell = "—"
        vs = ""
        if af:
            sa = summary(af[key], b[key])
            cell = f"{sa['accuracy']:.1%} ({sa['ci95'][0]:.1%}-{sa['ci95'][1]:.1%})"
            m = sa["vs_base"]
            vs = f"+{m['other_only']}/-{m['base_only']}, p={m['p_value']}"
        lines.append(f"| {label} | {sb['accuracy']:.1%} ({sb['ci95'][0]:.1%}-{sb['ci95'][1]:.1%}) | {cell} | {vs} |")
    if "sc8_family" in b:
        sc = summary(b["sc8_family"])
        sub = {k: v for k, v in b["family"].items() if k in b["sc8_family"]}
        cell = "—"
        if af:
            s2 = summary({k: v for k, v in af["family"].items() if k in sub})
            cell = f"greedy after {s2['accuracy']:.1%}"
        lines.append(f"| SC@8 on the first {sc['n']} unseen (greedy base {summary(sub)['accuracy']:.1%}) | "
                     f"{sc['accuracy']:.1%} ({sc['ci95'][0]:.1%}-{sc['ci95'][1]:.1%}) | {cell} | |")
    if not r.get("cycle"):  # --adapter or --before-only: no traffic, no cycle to describe
        lines += ["", f"- adapter measured: {a.get('adapter') or 'none (base only)'}"]
        return "\n".join(lines)
    for i, one in enumerate([*r.get("earlier_cycles", []), r]):
        lines += _cycle_lines(one, f"cycle {i + 1} of {many}, " if many > 1 else "")
    return "\n".join(lines)


def _cycle_lines(r: dict[str, Any], label: str) -> list[str]:
    c = r["cycle"]
    rep = c.get("report") or {}
    phases = rep.get("phases_s") or {}
    # What a cycle costs before its adapter serves: everything but the report-only vote after it.
    verdict = sum(v for k, v in phases.items() if k != "report") if phases else float(c.get("wall_s") or 0.0)
    live = r.get("live") or {}
    how = json.dumps(live.get("strategy", LIVE))
    return ["", f"- {label}live: {live.get('sent')} queries through sharpen ({how}), {live.get('queued')} "
            f"queued as uncertain ({live.get('seconds')} s)",
            f"- labelling: {json.dumps(rep.get('labelling'))}",
            f"- cycle: {c.get('status')} ({c.get('error') or rep.get('reason') or 'promoted'}); examples "
            f"{c.get('examples')} train / {c.get('heldout')} held out; train "
            f"{json.dumps({k: (c.get('train') or {}).get(k) for k in ('step', 'total_steps', 'loss')})}",
            f"- gate: held-out {json.dumps(rep.get('heldout'))}; canary {json.dumps(rep.get('canary'))}",
            f"- phases (s): {json.dumps(phases)}; to the verdict {verdict:.0f} s "
            f"({'within' if verdict <= TARGET_S else 'over'} the {TARGET_S:.0f} s target), then the report-only "
            f"canary vote {phases.get('report', 0.0):.0f} s; job wall {c.get('wall_s')} s"]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--upstream", help="a running vLLM's OpenAI base URL (…/v1) instead of starting one")
    ap.add_argument("--base-model-path", help="with --upstream: the served model's Hugging Face folder")
    ap.add_argument("--family", default="basic_arithmetic",
                    help="a reasoning-gym family, or a question/answer JSONL from outside the project")
    ap.add_argument("--unrelated", default="letter_counting")
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--queries-seed", type=int, default=SEED_A, help="the live queries' seed (another for a 2nd cycle)")
    ap.add_argument("--cycles", type=int, default=1,
                    help="cycles in one service, each on its own live queries; the last one's adapter is measured")
    ap.add_argument("--unseen-from", type=int, default=128, help="with a JSONL --family: the unseen block's first row")
    ap.add_argument("--start-from", help="an earlier run's adapt/adapters.sqlite3: its newest adapter is current")
    ap.add_argument("--train-from", choices=("base", "current"), default="base", help="adapt.train_from")
    ap.add_argument("--live-strategy", default=json.dumps(LIVE),
                    help="the live queries' strategy (JSON); its candidates are reused by the labeller")
    ap.add_argument("--eval", type=int, default=150)
    ap.add_argument("--eval-unrelated", type=int, default=100)
    ap.add_argument("--sc-items", type=int, default=50)
    ap.add_argument("--canary-items", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--mode", choices=["ttrl", "ttsi"], default="ttrl")
    ap.add_argument("--siblings", type=int, default=2)
    ap.add_argument("--label-n", type=int, default=8)
    ap.add_argument("--label-concurrency", type=int, default=8, help="adapt.label_concurrency: questions at once")
    ap.add_argument("--min-share", type=float, default=0.5)
    ap.add_argument("--label-vote", choices=("programs", "pooled"), default="programs",
                    help="agreeing programs set the label, or all answers pool (adapt.label_vote)")
    ap.add_argument("--traces", action="store_true", help="adapt.label_traces: the programs' working as rationales")
    ap.add_argument("--rationalize", type=int, default=0,
                    help="hinted samples for a clear label no rationale reached (STaR; 0: skip it)")
    ap.add_argument("--rationales", type=int, default=4)
    ap.add_argument("--early-stop", action="store_true",
                    help="adapt.label_early_stop: skip the prose still missing where agreeing programs settled "
                         "the label and the live samples hold --rationales agreeing ones")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--gate-margin", type=float, default=0.05)
    ap.add_argument("--gate-samples", type=int, default=4, help="adapt.gate_samples: sampled answers per gate item")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--before", help="reuse the 'before' figures of an earlier run's JSON (same items)")
    ap.add_argument("--before-only", action="store_true", help="measure the base model only")
    ap.add_argument("--adapter", help="no live traffic or cycle: measure this trained adapter folder against the base")
    ap.add_argument("--scratch", default="/tmp/adapt_bench")
    ap.add_argument("--out", help="write the report as JSON here")
    ns = ap.parse_args()
    if ns.cycles < 1:
        ap.error("--cycles must be at least 1")
    if ns.upstream and not ns.base_model_path:
        ap.error("--upstream needs --base-model-path")
    if ns.base_model_path:
        ns.base_model_path = str(Path(ns.base_model_path).absolute())  # vLLM and the trainer need it so
    if ns.adapter:
        ns.adapter = str(Path(ns.adapter).absolute())
    return ns


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    """``main``, cancelled cleanly (vLLM and the trainer stopped) on SIGTERM or SIGINT."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await main(args)


if __name__ == "__main__":
    a = parse()
    try:
        result = asyncio.run(_run(a))
    except asyncio.CancelledError:
        print("\ninterrupted: vLLM and the trainer were stopped", flush=True)
        sys.exit(130)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    if "before" in result:
        print(render(result))
