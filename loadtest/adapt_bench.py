"""One full adaptation cycle on CPU, timed per stage, with held-out accuracy before and after.

    .venv/bin/python loadtest/adapt_bench.py [--model qwen2.5-coder-0.5b-instruct]
        [--upstream URL --base-model-path DIR] [--queries 12] [--siblings 3] [--bon-n 4]
        [--given 0] [--eval 40] [--max-steps 60] [--epochs 3] [--batch-size 4] [--threads 2]
        [--kv-cache-gib 2] [--seed 7] [--scratch /tmp/adapt_bench] [--out FILE.json]

Starts the model on the embedded vLLM (``prepare_model`` + ``VLLMProcess``, runtime LoRA,
``--max-lora-rank 8``) unless ``--upstream`` names a running one (then ``--base-model-path``
is its Hugging Face folder). Then, with ``adapt.service.AdaptationService`` and the real
``LocalProcessTrainer`` (peft, a child process):

1. Held-out accuracy of the base model: ``--eval`` arithmetic word problems (seeded, gold
   answers computed), greedy, final answer extracted with ``strategies.answers.extract``.
2. One cycle, the production code path: ``--queries`` such problems (other numbers) are put in
   the tenant's uncertain-query queue as the proxy would; the cycle writes ``--siblings``
   similar questions per query, answers each with best_of_n (``--bon-n``, approval + agreement
   verifiers) and keeps the approved ones, splits off a held-out part, trains a rank-8 LoRA,
   loads it, gates it against the base and (if it wins) swaps it in. With ``--given N`` the
   cycle instead trains on N gold-answered problems (the upper bound a perfect teacher gives).
   Each stage is timed from the job's stage changes; the total is compared with 10 minutes.
3. Held-out accuracy of the adapter (loaded again under a scratch name if the gate rejected
   it), on the same problems as 1.

What it measures is what it prints: on a small model, self-generated data verified by the same
small model can help, do nothing, or hurt; the gate is there to catch the last two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapt.config import AdaptConfig  # noqa: E402
from adapt.data import Example  # noqa: E402
from adapt.service import AdaptationService  # noqa: E402
from adapt.trainer import LocalProcessTrainer  # noqa: E402
from evals.report import wilson  # noqa: E402
from protocol.errors import SharpenError  # noqa: E402
from protocol.events import EventBus  # noqa: E402
from server.settings import UpstreamSettings  # noqa: E402
from server.upstream import Upstream  # noqa: E402
from strategies.answers import extract  # noqa: E402

TARGET_S = 600.0
# The questions go as users would ask them. Measured on this model: adding "End your reply with
# 'The answer is X.'" makes the 0.5B model skip its working (4/20 right, against 13/20 without),
# and makes it answer the question instead of writing siblings of it.
INSTRUCTION = ""
TENANT = "bench"

# ---- the problems: short arithmetic word problems the 0.5B model often gets wrong ----------------

Solve = Callable[[int, int], tuple[int, str]]  # (a, b) -> (answer, worked solution)

_TEMPLATES: list[tuple[str, Solve]] = [
    ("A box holds {a} pencils. How many pencils are in {b} boxes?",
     lambda a, b: (a * b, f"{b} boxes x {a} pencils = {a * b} pencils.")),
    ("A train travels {a} km every hour. How many km does it travel in {b} hours?",
     lambda a, b: (a * b, f"{a} km x {b} hours = {a * b} km.")),
    ("Tom has {a} marbles and buys {b} bags of 6 marbles. How many marbles does he have now?",
     lambda a, b: (a + 6 * b, f"{b} bags x 6 = {6 * b} marbles; {a} + {6 * b} = {a + 6 * b}.")),
    ("A farmer has {a} eggs and packs them in cartons of {b}. How many eggs are left over?",
     lambda a, b: (a % b, f"{a} = {a // b} x {b} + {a % b}, so {a % b} eggs are left over.")),
    ("A ticket costs {a} dollars. How much do {b} tickets cost, minus a 10 dollar discount?",
     lambda a, b: (a * b - 10, f"{b} x {a} = {a * b} dollars; {a * b} - 10 = {a * b - 10} dollars.")),
]


def problems(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (question, gold answer, worked solution) triples, seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text, solve = _TEMPLATES[i % len(_TEMPLATES)]
        a, b = rng.randint(12, 97), rng.randint(3, 19)
        gold, steps = solve(a, b)
        out.append((text.format(a=a, b=b) + INSTRUCTION, str(gold), f"{steps}\nThe answer is {gold}."))
    return out


async def accuracy(up: Upstream, model: str, items: list[tuple[str, str, str]], max_tokens: int,
                   concurrency: int = 8) -> tuple[int, float, list[str | None]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(q: str) -> str | None:
        async with sem:
            body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                    "temperature": 0.0}
            try:
                reply = await up.request("POST", "/chat/completions", json.dumps(body).encode())
                data = await reply.json()
            except SharpenError as exc:
                print(f"  eval call failed: {exc.message}", flush=True)
                return None
            return extract(str((data["choices"][0].get("message") or {}).get("content") or ""))

    t0 = time.perf_counter()
    got = await asyncio.gather(*(one(q) for q, _, _ in items))
    right = sum(g == gold for g, (_, gold, _) in zip(got, items, strict=True))
    return right, time.perf_counter() - t0, list(got)


@contextlib.asynccontextmanager
async def backend(args: argparse.Namespace) -> AsyncIterator[tuple[str, str]]:
    """(upstream base URL, base model's HF folder)."""
    if args.upstream:
        if not args.base_model_path:
            raise SystemExit("--upstream needs --base-model-path (the served model's Hugging Face folder)")
        yield args.upstream.rstrip("/"), args.base_model_path  # absolute (parse() makes it so)
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


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(args.scratch)
    await asyncio.to_thread(scratch.mkdir, parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": vars(args), "load_avg_start": os.getloadavg(), "cpus": os.cpu_count()}
    evalset = problems(args.eval, seed=args.seed + 1000)
    async with backend(args) as (url, base_path):
        up = Upstream(url, UpstreamSettings.model_validate({"timeouts": {"first_byte": 1800, "idle": 900}}))
        try:
            models = (await up.get_json("/models"))["data"]
            base = next(str(c["id"]) for c in models if not c.get("parent"))
            report["base"] = base
            print(f"base model {base}; weights {base_path}", flush=True)

            print(f"\nheld-out accuracy of the base model on {len(evalset)} problems ...", flush=True)
            k, secs, _ = await accuracy(up, base, evalset, args.eval_max_tokens)
            report["before"] = {"right": k, "n": len(evalset), "seconds": round(secs, 1)}
            print(f"  base: {k}/{len(evalset)} ({secs:.0f} s)", flush=True)

            settings = AdaptConfig(
                enabled=True, tenants=[TENANT], base_model_path=base_path, siblings=args.siblings, bon_n=args.bon_n,
                max_queries=args.queries, max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
                threads=args.threads, learning_rate=args.learning_rate, gate_margin=args.gate_margin)
            svc = AdaptationService(settings, scratch / f"adapt-{int(time.time())}", up, EventBus(),
                                    trainer=LocalProcessTrainer())
            await svc.start(base)
            try:
                examples: list[Example] | None = None
                if args.given:
                    examples = [Example(task=q, answer=w, reference=g)
                                for q, g, w in problems(args.given, seed=args.seed)]
                else:
                    for q, _, _ in problems(args.queries, seed=args.seed):
                        svc.queue.add(TENANT, q, "", 0.75, base)  # as the proxy queues an unsure request
                t0 = time.perf_counter()
                job = svc.run_cycle(TENANT, examples=examples)
                marks: list[tuple[str, float]] = []
                last, step = None, None
                while job.finished is None:
                    if job.stage != last:
                        last = job.stage
                        marks.append((job.stage, time.perf_counter() - t0))
                        print(f"  [{marks[-1][1]:6.1f} s] stage {job.stage}", flush=True)
                    if job.stage == "train":
                        prog = svc.progress(job).get("train") or {}
                        if prog.get("step") and prog["step"] != step:
                            step = prog["step"]
                            print(f"  [{time.perf_counter() - t0:6.1f} s]   step {step}/{prog.get('total_steps')} "
                                  f"loss {prog.get('loss')}", flush=True)
                    await asyncio.sleep(0.05)
                total = time.perf_counter() - t0
                marks.append(("done", total))
                stages = {name: round(marks[i + 1][1] - at, 1) for i, (name, at) in enumerate(marks[:-1])}
                report["cycle"] = {"status": job.status, "error": job.error, "adapter": job.adapter,
                                   "examples": job.examples, "heldout": job.heldout, "score_new": job.score_new,
                                   "score_old": job.score_old, "train": job.train, "stages_s": stages,
                                   "total_s": round(total, 1), "target_s": TARGET_S}
                if not args.given:
                    n_asked = args.queries * (1 + args.siblings)
                    report["cycle"]["questions_synthesized"] = n_asked

                if job.adapter and job.status in ("succeeded", "rejected"):
                    name = job.adapter
                    v = svc.registry.get(name)
                    assert v is not None
                    loaded_here = job.status == "rejected"
                    if loaded_here:  # the gate unloaded it: load it again to measure it anyway
                        name = f"{job.adapter}-eval"
                        await up.load_lora_adapter(name, v.path)
                    print(f"held-out accuracy of {name} ...", flush=True)
                    k2, secs2, _ = await accuracy(up, name, evalset, args.eval_max_tokens)
                    report["after"] = {"right": k2, "n": len(evalset), "seconds": round(secs2, 1), "model": name}
                    print(f"  adapter: {k2}/{len(evalset)} ({secs2:.0f} s)", flush=True)
                    if loaded_here:
                        await up.unload_lora_adapter(name)
                    else:
                        with contextlib.suppress(SharpenError):
                            await svc.rollback(TENANT, reason="benchmark over")
            finally:
                await svc.stop()
        finally:
            await up.aclose()
    report["load_avg_end"] = os.getloadavg()
    return report


def render(r: dict[str, Any]) -> str:
    c = r.get("cycle", {})
    lines = [f"\n## One adaptation cycle: {r.get('base')} on {r['cpus']} CPUs "
             f"(load average at start {r['load_avg_start'][0]:.1f}, at end {r['load_avg_end'][0]:.1f})\n",
             "| stage | seconds |", "|---|---|"]
    for name, secs in c.get("stages_s", {}).items():
        lines.append(f"| {name} | {secs} |")
    total = c.get("total_s", 0.0)
    verdict = "within" if total <= TARGET_S else "over"
    lines.append(f"| **total** | **{total}** ({verdict} the {TARGET_S:.0f} s target) |")
    lines.append("")
    src = (f"{r['args']['given']} given gold examples" if r["args"]["given"] else
           f"{r['args']['queries']} uncertain queries x (1 + {r['args']['siblings']} siblings) = "
           f"{c.get('questions_synthesized')} questions, best_of_n n={r['args']['bon_n']}")
    lines.append(f"- data: {src}; kept/used {c.get('examples')} train + {c.get('heldout')} held out")
    lines.append(f"- train: {json.dumps({k: c.get('train', {}).get(k) for k in ('step', 'total_steps', 'loss')})}")
    lines.append(f"- gate (held-out split of the cycle's data): new {c.get('score_new')} vs current "
                 f"{c.get('score_old')} -> {c.get('status')}" + (f" ({c.get('error')})" if c.get("error") else ""))
    for key, label in (("before", "base"), ("after", "adapter")):
        if key in r:
            e = r[key]
            lo, hi = wilson(e["right"], e["n"])
            lines.append(f"- held-out accuracy, {label}: {e['right']}/{e['n']} = {e['right'] / e['n']:.1%} "
                         f"(95% CI {lo:.0%}-{hi:.0%}; {e['seconds']} s)")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--upstream", help="a running vLLM's OpenAI base URL (…/v1) instead of starting one")
    ap.add_argument("--base-model-path", help="with --upstream: the served model's Hugging Face folder")
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--siblings", type=int, default=3)
    ap.add_argument("--bon-n", type=int, default=4)
    ap.add_argument("--given", type=int, default=0, help="train on N gold examples instead of synthesizing")
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--eval-max-tokens", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--gate-margin", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scratch", default="/tmp/adapt_bench")
    ap.add_argument("--out", help="write the report as JSON here")
    ns = ap.parse_args()
    if ns.base_model_path:
        ns.base_model_path = str(Path(ns.base_model_path).absolute())  # vLLM and the trainer need it so
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
    print(render(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2, default=str))
