"""Training data whose rationales are a program's printed steps, for an offline test of the idea.

    .venv/bin/python loadtest/trace_rationales.py --upstream http://127.0.0.1:PORT/v1 \\
        --family FILE.jsonl --rows 0:64 --out DIR

Where the model's prose cannot reach the answer its programs find (multi-step arithmetic: its
programs are right far more often than its prose), a rationale the model wrote cannot teach the
computation. Here the model writes its usual program-aided answer (``strategies.pal``'s
instruction); its top-level assignments are worked out one operation at a time
(``strategies.trace``) as it runs in the sandbox, and that working, ending with ``The answer is
X.`` (what the program printed last), is the rationale. Labels are the model's own: the answer that most of the ``--n``
programs print (a clear majority, as the labeller keeps), never the gold one, which is only
counted. Writes ``DIR/train.jsonl`` in the trainer's format (the question as ``sharpen eval``
and ``adapt_bench`` ask it, the printed steps as the answer; up to ``--per-question`` distinct
rationales each) and ``DIR/job.json`` for ``python -m adapt.train_worker``; the adapter it trains
is then measured with ``adapt_bench.py --adapter DIR/adapter --before RUN.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapt.config import AdaptConfig  # noqa: E402
from adapt.data import hyperparameters  # noqa: E402
from adapt.trainer import TrainJob, write_job_file  # noqa: E402
from evals.checkers import score  # noqa: E402
from evals.datasets import Item, load  # noqa: E402
from loadtest.machine import cpu_line  # noqa: E402
from strategies.pal import PAL_INSTRUCTION  # noqa: E402
from strategies.trace import worked_out  # noqa: E402


def majority(answers: list[str | None], min_votes: int = 2) -> str | None:
    """The answer most programs printed, if at least ``min_votes`` and more than half of those
    that printed one agree on it."""
    got = Counter(a for a in answers if a is not None)
    if not got:
        return None
    top, votes = got.most_common(1)[0]
    return top if votes >= min_votes and votes * 2 > sum(got.values()) else None


async def traces(client: httpx.AsyncClient, model: str, item: Item, n: int, max_tokens: int,
                 temperature: float) -> list[tuple[str | None, str | None]]:
    body = {"model": model, "n": n, "temperature": temperature, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": item.question + PAL_INSTRUCTION}]}
    r = await client.post("/chat/completions", json=body)
    r.raise_for_status()
    return list(await asyncio.gather(*(worked_out(c["message"]["content"] or "") for c in r.json()["choices"])))


async def build(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    start, _, stop = args.rows.partition(":")
    items = load(args.family)[int(start):int(stop)]
    sem = asyncio.Semaphore(args.concurrency)
    rows: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=args.upstream, timeout=600) as client:

        async def one(item: Item) -> None:
            async with sem:
                got = await traces(client, args.model, item, args.n, args.max_tokens, args.temperature)
            label = majority([a for _, a in got])
            if label is None:
                counts["no_majority"] += 1
                return
            counts["kept"] += 1
            counts["label_right"] += int(await score(item, f"The answer is {label}."))
            texts = list(dict.fromkeys(t for t, a in got if a == label and t))[: args.per_question]
            counts["rationales"] += len(texts)
            rows.extend({"messages": [{"role": "user", "content": item.prompt()}], "answer": t} for t in texts)

        await asyncio.gather(*(one(i) for i in items))
    return rows, {"cpu": cpu_line(), "questions": len(items), **counts, "args": vars(args)}


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """``train.jsonl`` and the trainer's ``job.json`` in ``--out``: a cycle's hyperparameters
    (``adapt.data.hyperparameters`` of the defaults, with ``--learning-rate`` and ``--max-steps``),
    the examples in the order written."""
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = AdaptConfig(learning_rate=args.learning_rate, max_steps=args.max_steps, threads=2)
    write_job_file(TrainJob(job_dir=str(out), base_model_path=args.base_model_path, examples=str(out / "train.jsonl"),
                            out_dir=str(out / "adapter"), data_hash="trace-rationales",
                            hyper=hyperparameters(config, curriculum=False)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="an OpenAI-compatible base URL with /v1")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--base-model-path", default=str(Path.home() / ".cache/sharpen/models/qwen2.5-coder-0.5b-instruct"))
    ap.add_argument("--family", required=True, help="a question/answer JSONL")
    ap.add_argument("--rows", default="0:64", help="START:STOP of the JSONL's items to label")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--per-question", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows, summary = asyncio.run(build(args))
    write(args, rows)
    print(json.dumps(summary, indent=1))
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
