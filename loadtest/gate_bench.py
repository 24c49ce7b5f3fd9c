"""The adaptation gate's wall time: four runs of 8 in flight (the gate before 2026-12-04) against
one pool per model with everything in flight (``adapt.gate.evaluate`` now), same adapter, same items.

    flock /tmp/sharpen-heavy.lock .venv/bin/python -m loadtest.gate_bench --adapter DIR
        --heldout JOB_DIR/heldout.jsonl --canary CANARY.jsonl [--rounds 2] [--max-tokens 256] [--samples 4]

Starts vLLM (LoRA slots on, as ``loadtest.adapt_bench`` does), loads ``--adapter``, then per
round, alternating which goes first: the old order (held-out new, held-out base, canary new,
canary base; ``score_model`` with concurrency 8 each) and the pooled one. Prints seconds per
variant (median over rounds, range) and the scores each gave (greedy answers of the same models
agree, batching may move a tie; with ``--samples`` k, the default gate's, the sampled answers
move them a little). The figures in the README before 2026-12-05 are of ``--samples 0``. CPU
model and flags and the load average beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from adapt import canary as canary_file
from adapt.data import Example
from adapt.gate import evaluate, score_model
from loadtest.adapt_bench import backend
from loadtest.machine import cpu_line
from server.settings import UpstreamSettings
from server.upstream import Upstream


def load_heldout(path: str) -> list[Example]:
    """A job's ``heldout.jsonl`` (``Example`` fields, pseudo-label in ``reference``)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Example(**r) for r in rows]


async def old_order(up: Upstream, new: str, base: str, heldout: list[Example], canary: list[Example],
                    max_tokens: int, samples: int) -> list[float]:
    scores = []
    for exs in (heldout, canary):
        for m in (new, base):
            scores.append((await score_model(up, m, base, exs, concurrency=8, max_tokens=max_tokens,
                                                samples=samples))[0])
    return scores


async def main(args: argparse.Namespace) -> None:
    heldout = load_heldout(args.heldout)
    canary = canary_file.load(args.canary)
    print(f"# {cpu_line()}; {len(heldout)} held-out, {len(canary)} canary items, max_tokens {args.max_tokens}, "
          f"samples {args.samples}")
    async with backend(args) as (url, _), httpx.AsyncClient(base_url=url, timeout=1800) as vllm:
        base = next(str(m["id"]) for m in (await vllm.get("/models")).json()["data"] if not m.get("parent"))
        (await vllm.post("/load_lora_adapter", json={"lora_name": "gate-new", "lora_path": args.adapter},
                         timeout=300)).raise_for_status()
        up = Upstream(url, UpstreamSettings())
        times: dict[str, list[float]] = {"four runs of 8": [], "one pool per model": []}
        scores: dict[str, list[Any]] = {k: [] for k in times}
        try:
            for r in range(args.rounds):
                order = list(times) if r % 2 == 0 else list(times)[::-1]
                for variant in order:
                    t0 = time.perf_counter()
                    if variant == "four runs of 8":
                        got = await old_order(up, "gate-new", base, heldout, canary, args.max_tokens, args.samples)
                    else:
                        g = await evaluate(up, "gate-new", base, base, heldout, 0.05, canary=canary,
                                           max_tokens=args.max_tokens, samples=args.samples)
                        got = [g.score_new, g.score_old, g.canary_new or 0.0, g.canary_old or 0.0]
                    times[variant].append(time.perf_counter() - t0)
                    scores[variant].append([round(x or 0.0, 3) for x in got])
                    print(f"round {r + 1} {variant}: {times[variant][-1]:.1f} s, scores {scores[variant][-1]}, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            await up.aclose()
    print("\n| gate order | wall s, median [range] | held-out new/base, canary new/base |")
    print("|---|---|---|")
    for v, ts in times.items():
        print(f"| {v} | {statistics.median(ts):.1f} [{min(ts):.1f}-{max(ts):.1f}] | {scores[v]} |")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--heldout", required=True, help="a job's heldout.jsonl")
    ap.add_argument("--canary", required=True, help="JSONL of question/answer")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4, help="adapt.gate_samples (0: the greedy-only gate)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--upstream", default=None)
    ap.add_argument("--base-model-path", default=None)
    ap.add_argument("--scratch", default="/tmp/gate_bench")
    return ap.parse_args()


if __name__ == "__main__":
    a = parse()
    Path(a.scratch).mkdir(parents=True, exist_ok=True)
    asyncio.run(main(a))
