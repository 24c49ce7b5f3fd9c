"""How well a gate rule tells adapters apart: greedy answers against greedy + sampled answers.

    .venv/bin/python loadtest/gate_power.py --upstream http://127.0.0.1:PORT/v1 \\
        --run A=/tmp/ab_amx --run B=/tmp/ab_amx2 --run C=/tmp/ab_amx3 --out FILE.json
    .venv/bin/python loadtest/gate_power.py --analyze FILE.json

Each ``--run NAME=SCRATCH`` is an ``adapt_bench`` scratch folder holding one cycle's job (its
``heldout.jsonl``, pseudo-labelled) and its ``canary.jsonl`` (gold); the upstream is a vLLM that
serves the base and each cycle's adapter under NAME (``--lora-modules NAME=...``). One model is
in flight at a time (the gate's own rule). Every item is answered once greedily and ``--k``
times at ``--temperature`` (one n=k call), on: the base and each adapter on its own cycle's
held-out split, all models on the canary, and all on the first ``--unseen`` items of the
family's unseen set (seed B of ``adapt_bench``, gold answers).

The analysis prints, per adapter and per measure (greedy alone; the k samples; greedy and
samples together), the mean difference to the base and the spread of the per-item differences
(what decides how many items a gate needs), and the probability that a gate of 8 or 24 items
drawn from the unseen set would promote the adapter at margins 0 and 0.05 (bootstrap). Compare
with the adapter's measured gain on 150 unseen items (``adapt_bench``'s result files). Last, the
canary's rule (``adapt.canary_z``): how often 16 items block an adapter with no effect on them,
and one that costs each item 0.05-0.20 (``canary_rule``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics as st
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapt.gate import canary_allowed_drop  # noqa: E402
from evals.checkers import score  # noqa: E402
from evals.datasets import Item  # noqa: E402
from loadtest.adapt_bench import SEED_B, items  # noqa: E402
from loadtest.machine import cpu_line  # noqa: E402
from strategies.answers import extract  # noqa: E402

Checker = Callable[[str], Awaitable[float]]
Scores = dict[str, list[float]]  # {"greedy": [0/1], "samples": [0/1] * k}


def exact(reference: str) -> Checker:
    """The gate's own rule: the extracted final answer equals the (pseudo-)label."""
    async def check(text: str) -> float:
        return 1.0 if extract(text) == reference else 0.0
    return check


def gold(item: Item) -> Checker:
    async def check(text: str) -> float:
        return await score(item, text)
    return check


async def answer(client: httpx.AsyncClient, sem: asyncio.Semaphore, model: str, prompt: str, check: Checker,
                 k: int, temperature: float, max_tokens: int) -> Scores:
    async with sem:
        out: Scores = {}
        for name, extra in (("greedy", {"temperature": 0.0}), ("samples", {"temperature": temperature, "n": k})):
            r = await client.post("/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                **extra}, timeout=1800)
            r.raise_for_status()
            out[name] = [await check(c["message"]["content"] or "") for c in r.json()["choices"]]
        return out


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def questions(args: argparse.Namespace, runs: dict[str, str]) -> dict[str, list[tuple[str, str, Checker]]]:
    """Per model: (key, prompt, checker) for each item it answers."""
    held = {name: jsonl(next(Path(d).glob("data-*/adapt/jobs/*/heldout.jsonl"))) for name, d in runs.items()}
    canary = jsonl(Path(next(iter(runs.values()))) / "canary.jsonl")
    shared: list[tuple[str, str, Checker]] = [
        (f"canary-{i}", e["question"], gold(Item(id=f"c{i}", question=e["question"], answer=e["answer"],
                                                 checker="numeric"))) for i, e in enumerate(canary)]
    shared += [(it.id, it.prompt(), gold(it)) for it in items(args.family, args.unseen, SEED_B)]
    return {model: [(f"held{run}-{i}", e["task"], exact(e["reference"]))
                    for run, examples in held.items() if model in (args.base, run)
                    for i, e in enumerate(examples)] + shared
            for model in [args.base, *runs]}


async def collect(args: argparse.Namespace) -> dict[str, Any]:
    asked = await asyncio.to_thread(questions, args, dict(r.split("=", 1) for r in args.run))
    out: dict[str, Any] = {"cpu": cpu_line(), "args": vars(args), "models": {}}
    async with httpx.AsyncClient(base_url=args.upstream, timeout=1800) as client:
        for model, todo in asked.items():  # one model in flight at a time
            t0, sem = time.perf_counter(), asyncio.Semaphore(args.concurrency)
            got = await asyncio.gather(*(answer(client, sem, model, prompt, check, args.k, args.temperature,
                                                args.max_tokens) for _, prompt, check in todo))
            out["models"][model] = {key: g for (key, _, _), g in zip(todo, got, strict=True)}
            print(f"{model}: {len(todo)} items in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


MEASURES: dict[str, Callable[[Scores], float]] = {
    "greedy": lambda s: s["greedy"][0],
    "samples": lambda s: sum(s["samples"]) / len(s["samples"]),
    "greedy+samples": lambda s: (sum(s["greedy"]) + sum(s["samples"])) / (len(s["greedy"]) + len(s["samples"])),
}


def analyze(data: dict[str, Any], base: str, draws: int = 4000) -> str:
    models = data["models"]
    lines = [f"CPU: {data.get('cpu', '?')}", "",
             "| adapter | measure | split | items | base | adapter | mean diff | sd of item diffs |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    power = ["", "| adapter | measure | P(promote), 8 items, margin 0 | 8 items, 0.05 | 24 items, 0 | 24 items, 0.05 |",
             "|---|---|---:|---:|---:|---:|"]
    for x in (m for m in models if m != base):
        splits = {"unseen": [k for k in models[x] if not k.startswith(("held", "canary"))],
                  "canary": [k for k in models[x] if k.startswith("canary")],
                  "held-out": [k for k in models[x] if k.startswith(f"held{x}-")]}
        rng = random.Random(0)
        for name, f in MEASURES.items():
            for split, keys in splits.items():
                d = [f(models[x][k]) - f(models[base][k]) for k in keys]
                was, now = st.mean(f(models[base][k]) for k in keys), st.mean(f(models[x][k]) for k in keys)
                lines.append(f"| {x} | {name} | {split} | {len(keys)} | {was:.3f} | {now:.3f} | {st.mean(d):+.3f} "
                             f"| {st.pstdev(d):.3f} |")
            d = [f(models[x][k]) - f(models[base][k]) for k in splits["unseen"]]
            cells = [sum(st.mean(rng.choices(d, k=n)) >= margin - 1e-9 for _ in range(draws)) / draws
                     for n in (8, 24) for margin in (0.0, 0.05)]
            power.append(f"| {x} | {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines + power + canary_rule(data, base, draws))


def canary_rule(data: dict[str, Any], base: str, draws: int, n: int = 16) -> list[str]:
    """The canary's rule (``adapt.canary_z``): block when the score drops by more than z standard
    errors of the per-item differences. On an adapter that changes nothing (each item's
    difference given a random sign: the measured spread, no effect) and on one that costs every
    item ``delta`` (the same, shifted), how often ``n`` items drawn from the unseen set block."""
    models, f = data["models"], MEASURES["greedy+samples"]
    diffs = [[f(models[x][k]) - f(models[base][k]) for k in models[x] if not k.startswith(("held", "canary"))]
             for x in models if x != base]
    out = ["", f"| canary rule ({n} items, greedy+samples) | P(block), no effect | a drop of 0.05 | 0.10 | 0.20 |",
           "|---|---:|---:|---:|---:|"]
    for z in (0.0, 1.0, 1.645):
        rng, cells = random.Random(1), []
        for delta in (0.0, 0.05, 0.10, 0.20):
            hits = 0
            for d in diffs:
                for _ in range(draws):
                    xs = [x * rng.choice((-1, 1)) - delta for x in rng.sample(d, n)]
                    hits += st.mean(xs) < -canary_allowed_drop(xs, 0.0, z) - 1e-9  # the gate's own rule
            cells.append(hits / (draws * len(diffs)))
        out.append(f"| z = {z} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return out


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", help="vLLM's OpenAI base URL (…/v1) serving the base and the adapters")
    ap.add_argument("--run", action="append", default=[], help="NAME=adapt_bench scratch folder (repeatable)")
    ap.add_argument("--base", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--family", default="letter_counting")
    ap.add_argument("--unseen", type=int, default=40)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", help="write the answers' scores as JSON here")
    ap.add_argument("--analyze", help="only print the analysis of an earlier --out file")
    return ap.parse_args()


def main() -> None:
    args = parse()
    if args.analyze:
        data = json.loads(Path(args.analyze).read_text())
    else:
        data = asyncio.run(collect(args))
        if args.out:
            Path(args.out).write_text(json.dumps(data))
    print(analyze(data, args.base))


if __name__ == "__main__":
    main()
