"""What the test-time strategies cost and buy on a real model: wall time, tokens, accuracy.

    .venv/bin/python loadtest/strategies_bench.py [--model qwen2.5-coder-0.5b-instruct | --upstream URL]
        [--part a|b|ab] [--questions 5] [--items 50] [--tasks basic_arithmetic,gsm_symbolic]
        [--n 8] [--max-tokens 384] [--concurrency 4] [--seed 42] [--out loadtest/results]

Starts the model on the embedded vLLM (``server.backend``: ``prepare_model`` + ``VLLMProcess``)
unless ``--upstream`` names a running OpenAI-compatible server, and sharpen in-process in front
of it (``tests.proxy_server.ProxyServer``). Then:

a. Wall time, one request at a time: best_of_n (n=8; verifiers approval, math_steps,
   logic_steps, rederive + agreement) against ONE plain n=8 call straight to the upstream with
   the same prompt and max_tokens. The ratio of the two is what BoN-MAV's verification adds.
b. Accuracy and tokens on seeded reasoning-gym items: greedy (passthrough, temperature 0),
   self_consistency n=8 and best_of_n n=8, each its own phase over every item, ``--concurrency``
   items at a time. Answers are extracted with ``strategies.answers.extract`` (the prompt asks
   the model to end with "The answer is X.") and scored with the dataset's own
   ``score_answer``. Besides accuracy (95% Wilson interval), tokens per item and wall time, it
   reports the candidates' oracle (pass@n: some candidate was right) and how well each verifier
   separates right candidates from wrong ones (AUROC), i.e. how good the model is as a verifier.

Raw per-item results go to ``<out>/strategies_bench-<model>-<time>.jsonl`` (candidates'
answers and verdicts, content truncated); full candidate texts and vLLM's log to ``--scratch``.
Figures print as Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.report import wilson  # noqa: E402
from loadtest.selection_bench import upstream_for  # noqa: E402
from strategies.answers import extract  # noqa: E402

VERIFIERS = ["approval", "math_steps", "logic_steps", "rederive", "agreement"]
INSTRUCTION = ("\n\nSolve it step by step, briefly. End your reply with a line of the form "
               "'The answer is X.' where X is only the final number.")
# Task configurations: basic_arithmetic's defaults (up to 6 terms of 4 digits) are out of a small
# model's reach, which would leave nothing for a strategy to choose between.
TASK_CONFIG: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 4, "max_digits": 2},
    "gsm_symbolic": {},
    "chain_sum": {},
}


# ---- items and scoring -----------------------------------------------------------------------


@dataclass
class Item:
    task: str
    idx: int
    question: str
    gold: str
    entry: dict[str, Any]
    dataset: Any = field(repr=False)

    def score(self, answer: str | None) -> float:
        """1.0 when the dataset's ``score_answer`` gives full marks, else 0.0 (its partial credit,
        e.g. 0.01 for a wrong number, is not an answer half right)."""
        if answer is None:
            return 0.0
        try:
            return 1.0 if float(self.dataset.score_answer(answer, self.entry)) >= 1.0 else 0.0
        except Exception:
            return 0.0


def load_items(tasks: list[str], total: int, seed: int) -> list[Item]:
    import reasoning_gym

    per = [total // len(tasks) + (1 if i < total % len(tasks) else 0) for i in range(len(tasks))]
    out: list[Item] = []
    for task, size in zip(tasks, per, strict=True):
        ds = reasoning_gym.create_dataset(task, seed=seed, size=max(size, 1), **TASK_CONFIG.get(task, {}))
        out.extend(Item(task, i, e["question"], str(e["answer"]), e, ds) for i, e in enumerate(ds) if i < size)
    # Interleave the tasks so that a prefix of the list (part a, or an early stop) mixes them.
    out.sort(key=lambda it: (it.idx, tasks.index(it.task)))
    return out


def messages(item: Item) -> list[dict[str, str]]:
    return [{"role": "user", "content": item.question + INSTRUCTION}]


def auroc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a right candidate > score of a wrong one), ties half (Mann-Whitney)."""
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


# ---- HTTP ----------------------------------------------------------------------------------


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    async with session.post(url, json=body) as r:
        data = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {str(data)[:300]}")
    return data, time.perf_counter() - t0


def strategy_body(name: str, model: str, item: Item, n: int, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages(item), "max_tokens": max_tokens}
    if name == "greedy":
        body["temperature"] = 0
    elif name == "self_consistency":
        body.update(temperature=0.7, trace=True, strategy={"name": "self_consistency", "n": n})
    elif name == "best_of_n":
        body.update(temperature=0.7, trace=True, strategy={"name": "best_of_n", "n": n, "verifiers": VERIFIERS})
    else:
        raise ValueError(name)
    return body


# ---- the servers -----------------------------------------------------------------------------


async def served_model(session: aiohttp.ClientSession, upstream: str) -> str:
    async with session.get(upstream + "/models") as r:
        data = await r.json()
    return str(next(c["id"] for c in data["data"] if not c.get("parent")))


# ---- part a: wall time ---------------------------------------------------------------------


async def part_a(session: aiohttp.ClientSession, upstream: str, proxy: str, model: str, items: list[Item],
                 args: argparse.Namespace, out: Any) -> None:
    print(f"\n## a. Wall time: best_of_n (n={args.n}, {', '.join(VERIFIERS)}) vs one plain n={args.n} call\n",
          flush=True)
    plain_body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0.7, "n": args.n}
    # One warm-up call each, so neither side pays for first-request effects.
    await post(session, upstream + "/chat/completions", {**plain_body, "n": 1, "max_tokens": 8,
                                                         "messages": [{"role": "user", "content": "Hi"}]})
    rows = []
    for i, item in enumerate(items):
        runs: dict[str, tuple[dict[str, Any], float]] = {}
        order = ("plain", "bon") if i % 2 == 0 else ("bon", "plain")  # alternate: no side always goes first
        for which in order:
            if which == "plain":
                runs[which] = await post(session, upstream + "/chat/completions",
                                         {**plain_body, "messages": messages(item)})
            else:
                runs[which] = await post(session, proxy + "/chat/completions",
                                         strategy_body("best_of_n", model, item, args.n, args.max_tokens))
        (plain, tp), (bon, tb) = runs["plain"], runs["bon"]
        trace = bon["sharpen"]["trace"]
        cand = next(c for c in trace["calls"] if c["purpose"] == "candidates")
        verify = [c for c in trace["calls"] if c["purpose"].startswith("verify:")]
        row = {"part": "a", "task": item.task, "idx": item.idx, "plain_s": tp, "bon_s": tb,
               "bon_candidates_s": cand["seconds"], "bon_verify_calls": len(verify),
               "plain_usage": plain["usage"], "bon_usage": bon["usage"],
               "bon_candidates_usage": cand["usage"]}
        rows.append(row)
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(f"  q{i + 1} {item.task}: plain {tp:.1f} s, best_of_n {tb:.1f} s "
              f"(candidates {cand['seconds']:.1f} s + verification {tb - cand['seconds']:.1f} s), "
              f"ratio {tb / tp:.2f}", flush=True)
    sp, sb = sum(r["plain_s"] for r in rows), sum(r["bon_s"] for r in rows)
    ratios = [r["bon_s"] / r["plain_s"] for r in rows]

    def tok(rs: list[dict[str, Any]], k: str, f: str) -> float:
        return float(statistics.mean(r[k][f] for r in rs))

    print(f"\n| | plain n={args.n} | best_of_n n={args.n} (+{len(VERIFIERS) - 1} LLM verifiers, agreement) |")
    print("|---|---:|---:|")
    print(f"| mean wall time / question | {sp / len(rows):.1f} s | {sb / len(rows):.1f} s |")
    print(f"| mean prompt tokens / question | {tok(rows, 'plain_usage', 'prompt_tokens'):.0f} | "
          f"{tok(rows, 'bon_usage', 'prompt_tokens'):.0f} |")
    print(f"| mean completion tokens / question | {tok(rows, 'plain_usage', 'completion_tokens'):.0f} | "
          f"{tok(rows, 'bon_usage', 'completion_tokens'):.0f} |")
    print(f"| upstream calls / question | 1 | {1 + statistics.mean(r['bon_verify_calls'] for r in rows):.0f} |")
    print(f"\nbest_of_n / plain wall time: {sb / sp:.2f}x over {len(rows)} questions "
          f"(per question: median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x; target <= 2.5x)",
          flush=True)


# ---- part b: accuracy -------------------------------------------------------------------------


async def run_phase(session: aiohttp.ClientSession, proxy: str, model: str, name: str, items: list[Item],
                    args: argparse.Namespace, out: Any, cands_out: Any) -> dict[str, Any]:
    sem = asyncio.Semaphore(args.concurrency)
    rows: list[dict[str, Any]] = []
    done = 0

    async def one(item: Item) -> None:
        nonlocal done
        async with sem:
            row: dict[str, Any] = {"part": "b", "strategy": name, "task": item.task, "idx": item.idx,
                                   "gold": item.gold}
            try:
                data, secs = await post(session, proxy + "/chat/completions",
                                        strategy_body(name, model, item, args.n, args.max_tokens))
            except Exception as exc:
                row.update(error=str(exc)[:300], score=0.0, seconds=None, usage=None)
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                return
            content = data["choices"][0]["message"].get("content") or ""
            answer = extract(content)
            row.update(answer=answer, score=item.score(answer), seconds=round(secs, 3), usage=data.get("usage"),
                       finish_reason=data["choices"][0].get("finish_reason"), content=content[-400:])
            trace = (data.get("sharpen") or {}).get("trace")
            if trace:
                cands = trace["candidates"]
                row["candidates"] = [
                    {"answer": c["answer"], "score": item.score(c["answer"]), "finish_reason": c["finish_reason"],
                     "logprob": c["logprob"], "scores": c["scores"],
                     "verdicts": {k: v.get("score") for k, v in (c.get("verdicts") or {}).items()}}
                    for c in cands]
                row["calls"] = len(trace["calls"])
                first: dict[str, Any] = next((c for c in trace["calls"] if c["purpose"] == "candidates"), {})
                row["candidates_s"] = first.get("seconds")
                row["candidates_usage"] = first.get("usage")
                row["notes"] = trace["notes"]
                cands_out.write(json.dumps({"strategy": name, "task": item.task, "idx": item.idx,
                                            "contents": [c["content"] for c in cands]}) + "\n")
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            done += 1
            if done % 10 == 0 or done == len(items):
                acc = sum(r["score"] for r in rows) / len(rows)
                print(f"  {name}: {done}/{len(items)} items, accuracy so far {acc:.3f}", flush=True)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(it) for it in items))
    wall = time.perf_counter() - t0
    return {"name": name, "rows": rows, "wall": wall}


def vote(cands: list[dict[str, Any]]) -> dict[str, Any]:
    """self_consistency's pick among saved candidates: most votes, then finished normally, then the
    higher mean logprob (``strategies.self_consistency``'s order)."""
    votes = Counter(c["answer"] for c in cands if c["answer"] is not None)
    return min(cands, key=lambda c: (-votes.get(c["answer"], 0) if c["answer"] else 0,
                                     0 if c["finish_reason"] == "stop" else 1,
                                     -(c["logprob"] if c["logprob"] is not None else -1e9)))


def derived_sc(bon: dict[str, Any]) -> dict[str, Any]:
    """self_consistency on best_of_n's own candidates: the same n=N call, voted instead of verified."""
    rows = []
    for r in bon["rows"]:
        if not r.get("candidates"):
            continue
        pick = vote(r["candidates"])
        rows.append({**r, "strategy": "self_consistency", "answer": pick["answer"], "score": pick["score"],
                     "usage": r["candidates_usage"], "calls": 1, "seconds": r["candidates_s"]})
    wall = bon["wall"] * sum(r["seconds"] or 0 for r in rows) / max(sum(r["seconds"] or 0 for r in bon["rows"]), 1e-9)
    return {"name": "self_consistency", "rows": rows, "wall": wall, "derived": True}


def report_b(phases: list[dict[str, Any]], items: list[Item], args: argparse.Namespace, model: str) -> None:
    tasks = sorted({it.task for it in items})
    print(f"\n## b. Accuracy on reasoning-gym ({', '.join(f'{t}' for t in tasks)}; {len(items)} items, seed "
          f"{args.seed}), {model}, max_tokens {args.max_tokens}, {args.concurrency} items at a time\n")
    head = "| strategy | accuracy | 95% CI | " + " | ".join(tasks) + " | tokens/item | completion tokens/item " \
           "| upstream calls/item | wall time | s/item |"
    print(head)
    print("|---|---:|---|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|")
    for ph in phases:
        rows = ph["rows"]
        n = len(rows)
        k = sum(r["score"] for r in rows)
        lo, hi = wilson(k, n)
        per_task = []
        for t in tasks:
            tr = [r for r in rows if r["task"] == t]
            per_task.append(f"{sum(r['score'] for r in tr) / len(tr):.2f} ({len(tr)})" if tr else "-")
        ok = [r for r in rows if r.get("usage")]
        toks = statistics.mean(r["usage"]["total_tokens"] for r in ok) if ok else 0
        ctoks = statistics.mean(r["usage"]["completion_tokens"] for r in ok) if ok else 0
        calls = statistics.mean(r.get("calls", 1) for r in ok) if ok else 0
        label = {"greedy": "greedy (passthrough, T=0)", "self_consistency": f"self_consistency n={args.n}",
                 "best_of_n": f"best_of_n n={args.n} (4 aspects + agreement)"}[ph["name"]]
        if ph.get("derived"):
            label += " (vote over best_of_n's candidates; wall time pro rata)"
        errs = sum(1 for r in rows if r.get("error"))
        print(f"| {label} | {k / n:.3f} | {lo:.3f}-{hi:.3f} | " + " | ".join(per_task)
              + f" | {toks:.0f} | {ctoks:.0f} | {calls:.0f} | {ph['wall'] / 60:.1f} min | {ph['wall'] / n:.1f} |"
              + (f" ({errs} errors)" if errs else ""))
    # Paired: on the same items, where a strategy was right and greedy wrong, and the other way round.
    base = next((ph for ph in phases if ph["name"] == "greedy"), None)
    if base is not None:
        ref = {(r["task"], r["idx"]): r["score"] for r in base["rows"]}
        for ph in phases:
            if ph is base:
                continue
            pairs = [(r["score"], ref[(r["task"], r["idx"])]) for r in ph["rows"] if (r["task"], r["idx"]) in ref]
            print(f"\n{ph['name']} vs greedy on {len(pairs)} items: right where greedy was wrong "
                  f"{sum(a > b for a, b in pairs)}, wrong where greedy was right {sum(a < b for a, b in pairs)}")
    # The candidates: what a perfect chooser would get, and how each verifier ranks right vs wrong.
    for ph in phases:
        rows = [r for r in ph["rows"] if r.get("candidates")]
        if not rows:
            continue
        oracle = sum(any(c["score"] >= 1.0 for c in r["candidates"]) for r in rows) / len(rows)
        mean_c = statistics.mean(statistics.mean(c["score"] for c in r["candidates"]) for r in rows)
        print(f"\n{ph['name']}: oracle (pass@{args.n}) {oracle:.3f}; mean candidate accuracy {mean_c:.3f}; "
              f"chosen {sum(r['score'] for r in rows) / len(rows):.3f}")
        if ph["name"] != "best_of_n":
            continue
        names = sorted({k for r in rows for c in r["candidates"] for k in c["verdicts"]})
        print("\n| verifier | AUROC right vs wrong | mean score, right | mean score, wrong | failed calls |")
        print("|---|---:|---:|---:|---:|")
        for v in [*names, "combined"]:
            pos: list[float] = []
            neg: list[float] = []
            failed = 0
            for r in rows:
                for c in r["candidates"]:
                    s = c["scores"].get("verifiers") if v == "combined" else c["verdicts"].get(v)
                    if s is None:
                        failed += 1
                        continue
                    (pos if c["score"] >= 1.0 else neg).append(float(s))
            a = auroc(pos, neg)
            print(f"| {v} | {'-' if a is None else f'{a:.3f}'} | "
                  f"{statistics.mean(pos) if pos else float('nan'):.3f} | "
                  f"{statistics.mean(neg) if neg else float('nan'):.3f} | {failed} |")


# ---- main ----------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> None:
    from tests.proxy_server import ProxyServer

    out_dir = Path(args.out)
    items = load_items(args.tasks.split(","), max(args.items, args.questions), args.seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    timeout = aiohttp.ClientTimeout(total=1800)
    async with upstream_for(args) as upstream, aiohttp.ClientSession(timeout=timeout) as session:
        model = await served_model(session, upstream)
        proxy = await asyncio.to_thread(ProxyServer(upstream).start)
        path = out_dir / f"strategies_bench-{model}-{stamp}.jsonl"
        cpath = Path(args.scratch) / f"strategies_bench-{model}-{stamp}-candidates.jsonl.gz"
        print(f"model {model}; upstream {upstream}; sharpen {proxy.url}; results {path}", flush=True)
        try:
            with path.open("w") as out, gzip.open(cpath, "wt") as cands_out:
                out.write(json.dumps({"part": "config", "model": model, "args": vars(args), "tasks": TASK_CONFIG,
                                      "verifiers": VERIFIERS, "instruction": INSTRUCTION}) + "\n")
                if "a" in args.part:
                    await part_a(session, upstream, proxy.url, model, items[: args.questions], args, out)
                if "b" in args.part:
                    phases = []
                    for name in args.strategies.split(","):
                        print(f"\nphase {name}: {args.items} items", flush=True)
                        ph = await run_phase(session, proxy.url, model, name, items[: args.items], args, out,
                                             cands_out)
                        print(f"  {name}: {ph['wall']:.0f} s", flush=True)
                        out.write(json.dumps({"part": "phase", "strategy": name, "wall": ph["wall"],
                                              "items": len(ph["rows"])}) + "\n")
                        out.flush()
                        phases.append(ph)
                    if args.derive_sc and not any(ph["name"] == "self_consistency" for ph in phases):
                        bon = next((ph for ph in phases if ph["name"] == "best_of_n"), None)
                        if bon is not None:
                            phases.insert(-1, derived_sc(bon))
                    report_b(phases, items[: args.items], args, model)
        finally:
            await asyncio.to_thread(proxy.stop)


# ---- part c: another model as the verifier, on saved candidates --------------------------------


def load_saved(results: str, candidates: str) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """best_of_n's saved rows and full candidate texts, by (task, idx)."""
    rows = {(r["task"], r["idx"]): r for r in map(json.loads, Path(results).read_text().splitlines())
            if r["part"] == "b" and r["strategy"] == "best_of_n" and r.get("candidates")}
    with gzip.open(candidates, "rt") as f:
        texts = {(c["task"], c["idx"]): c["contents"] for c in map(json.loads, f) if c["strategy"] == "best_of_n"}
    return rows, texts


def save_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


async def part_c(upstream_url: str, model: str, results: str, candidates: str, args: argparse.Namespace) -> None:
    """Re-verifies saved best_of_n candidates with the model behind ``upstream_url``, through
    sharpen's own ``AspectVerifier`` and ``StrategyContext``, and re-ranks them as best_of_n does
    (mean of the verifier scores with agreement; ties to agreement, then logprob). One vLLM at a
    time: the generator's run is over, only its candidates are reused."""
    from server.settings import TimeoutSettings, UpstreamSettings
    from server.upstream import Upstream
    from strategies.base import Candidate, StrategyContext
    from strategies.verifiers import VerificationTask
    from strategies.verifiers.aspect import AspectVerifier

    aspects = [v for v in args.rescore_verifiers.split(",") if v != "agreement"]
    rows, texts = load_saved(results, candidates)
    keys = sorted(k for k in rows if k in texts)[: args.items]
    items = {(it.task, it.idx): it for it in load_items(args.tasks.split(","), 200, args.seed)}
    up = Upstream(upstream_url, UpstreamSettings(timeouts=TimeoutSettings(first_byte=1800, idle=1800)))
    sem = asyncio.Semaphore(args.concurrency)
    out: list[dict[str, Any]] = []
    print(f"\n## c. {model} as the verifier ({', '.join(aspects)} + agreement) of {len(keys)} items' saved "
          f"candidates\n", flush=True)

    async def one(key: tuple[str, int]) -> None:
        async with sem:
            item, saved = items[key], rows[key]
            cands = [Candidate(index=i, content=t, answer=c["answer"], finish_reason=c["finish_reason"],
                               logprob=c["logprob"]) for i, (t, c) in enumerate(zip(texts[key], saved["candidates"],
                                                                                   strict=True))]
            ctx = StrategyContext(upstream=up, body={}, endpoint="/chat/completions", model=model, tenant="bench",
                                  deadline=time.monotonic() + 3600)
            task = VerificationTask(messages=messages(item), candidates=cands)
            t0 = time.perf_counter()
            verdicts = await asyncio.gather(*(AspectVerifier(a).score(task, ctx) for a in aspects))
            votes = Counter(c.answer for c in cands if c.answer is not None)
            scored = []
            for i, (c, sc) in enumerate(zip(cands, saved["candidates"], strict=True)):
                agree = votes.get(c.answer, 0) / len(cands) if c.answer else 0.0
                vs = {a: verdicts[j][i].score for j, a in enumerate(aspects)}
                ok = [v for v in vs.values() if v is not None] + [agree]
                scored.append({"score": sc["score"], "verdicts": vs, "agreement": agree,
                               "verifiers": sum(ok) / len(ok), "logprob": c.logprob})
            best = min(scored, key=lambda c: (-c["verifiers"], -c["agreement"],
                                             -(c["logprob"] if c["logprob"] is not None else -1e9)))
            out.append({"key": key, "chosen": best["score"], "was": saved["score"], "cands": scored,
                        "seconds": time.perf_counter() - t0, "prompt_tokens": ctx.usage.prompt_tokens})
            print(f"  {len(out)}/{len(keys)} {key}: chosen {best['score']:.0f} (was {saved['score']:.0f}) "
                  f"{out[-1]['seconds']:.0f} s", flush=True)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(k) for k in keys))
    finally:
        await up.aclose()
    wall = time.perf_counter() - t0
    n = len(out)
    k_new, k_old = sum(r["chosen"] for r in out), sum(r["was"] for r in out)
    oracle = sum(any(c["score"] >= 1 for c in r["cands"]) for r in out)
    print(f"\nbest_of_n accuracy on these {n} items: {k_old / n:.3f} with the generator verifying itself, "
          f"{k_new / n:.3f} with {model} verifying (oracle {oracle / n:.3f}); {wall:.0f} s, "
          f"{statistics.mean(r['prompt_tokens'] for r in out):.0f} verifier prompt tokens/item")
    print("\n| verifier | AUROC right vs wrong | mean score, right | mean score, wrong |")
    print("|---|---:|---:|---:|")
    for v in [*aspects, "combined"]:
        pos = [c["verdicts"][v] if v != "combined" else c["verifiers"] for r in out for c in r["cands"]
               if c["score"] >= 1]
        neg = [c["verdicts"][v] if v != "combined" else c["verifiers"] for r in out for c in r["cands"]
               if c["score"] < 1]
        pos, neg = [x for x in pos if x is not None], [x for x in neg if x is not None]
        a = auroc(pos, neg)
        mp, mn = (statistics.mean(x) if x else float("nan") for x in (pos, neg))
        print(f"| {model} {v} | {'-' if a is None else f'{a:.3f}'} | {mp:.3f} | {mn:.3f} |")
    save_jsonl(Path(args.out) / f"strategies_bench-rescore-{model}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl", out)


async def rescore_main(args: argparse.Namespace) -> None:
    async with upstream_for(args) as upstream, aiohttp.ClientSession() as session:
        model = await served_model(session, upstream)
        await part_c(upstream, model, args.rescore[0], args.rescore[1], args)


def report_files(paths: list[str], args: argparse.Namespace) -> None:
    """Prints part b's tables from saved JSONL results (several files: later ones win per phase)."""
    phases: dict[str, dict[str, Any]] = {}
    model = "?"
    for p in paths:
        rows: dict[str, list[dict[str, Any]]] = {}
        for line in Path(p).read_text().splitlines():
            rec = json.loads(line)
            if rec["part"] == "config":
                model = rec["model"]
                for k in ("max_tokens", "concurrency", "seed", "n"):
                    setattr(args, k, rec["args"][k])
            elif rec["part"] == "b":
                rows.setdefault(rec["strategy"], []).append(rec)
            elif rec["part"] == "phase":
                phases[rec["strategy"]] = {"name": rec["strategy"], "rows": rows.pop(rec["strategy"], []),
                                           "wall": rec["wall"]}
    if args.derive_sc and "best_of_n" in phases and "self_consistency" not in phases:
        phases["self_consistency"] = derived_sc(phases["best_of_n"])
    order = ["greedy", "self_consistency", "best_of_n"]
    done = sorted(phases.values(), key=lambda ph: order.index(ph["name"]))
    if not done:
        raise SystemExit("no finished phase in these files")
    if args.items:  # the common first items only
        keep = set.intersection(*({(r["task"], r["idx"]) for r in ph["rows"]} for ph in done))
        for ph in done:
            full = len(ph["rows"])
            ph["rows"] = [r for r in ph["rows"] if (r["task"], r["idx"]) in keep]
            ph["wall"] *= len(ph["rows"]) / full  # pro rata
    items = [Item(r["task"], r["idx"], "", r["gold"], {}, None) for r in done[0]["rows"]]
    report_b(done, items, args, model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="packaged model for the embedded vLLM")
    ap.add_argument("--upstream", help="a running OpenAI-compatible server (.../v1) instead")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--part", default="ab", help="a (wall time), b (accuracy) or ab")
    ap.add_argument("--questions", type=int, default=5, help="part a: questions")
    ap.add_argument("--items", type=int, default=50, help="part b: items over all tasks")
    ap.add_argument("--tasks", default="basic_arithmetic,gsm_symbolic")
    ap.add_argument("--strategies", default="greedy,self_consistency,best_of_n")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(ROOT / "loadtest" / "results"), help="per-item JSONL (small)")
    ap.add_argument("--scratch", default="/tmp/strategies_bench", help="vLLM log, full candidate texts")
    ap.add_argument("--derive-sc", action="store_true",
                    help="without a self_consistency phase: vote over best_of_n's candidates (same n=N call)")
    ap.add_argument("--report", nargs="+", metavar="JSONL", help="only print part b's tables from saved results")
    ap.add_argument("--rescore", nargs=2, metavar=("RESULTS_JSONL", "CANDIDATES_GZ"),
                    help="part c: re-verify saved best_of_n candidates with --model/--upstream as the verifier")
    ap.add_argument("--rescore-verifiers", default="approval,math_steps,logic_steps,rederive")
    args = ap.parse_args()
    if args.rescore:
        for d in (args.out, args.scratch):
            Path(d).mkdir(parents=True, exist_ok=True)
        asyncio.run(rescore_main(args))
        return
    if args.report:
        report_files(args.report, args)
        return
    for d in (args.out, args.scratch):
        Path(d).mkdir(parents=True, exist_ok=True)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
