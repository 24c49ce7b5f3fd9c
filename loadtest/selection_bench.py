"""One generation pass that lets any answer selector be re-scored offline, on the default model.

    .venv/bin/python loadtest/selection_bench.py --generate [--sets tuning,report] [--chunk-s 480]
    .venv/bin/python loadtest/selection_bench.py --rescore [--gen FILE]

Generation talks straight to vLLM (started with the project's backend code, ``prepare_model`` +
``VLLMProcess``, as ``loadtest/strategies_bench.py`` does). Per reasoning-gym item, three calls:
- the greedy answer (temperature 0);
- N sampled candidates in one ``n=N`` call (temperature 0.7);
- K program-aided (PAL) candidates: a prompt asking for Python that prints the answer, each
  program run in ``strategies.sandbox`` (a failed or timed-out run abstains);
all with ``logprobs`` and ``top_logprobs``. Per candidate it stores the text (head and tail when
long), the finish reason, the extracted answer and whether it is right, and per token the chosen
token's logprob and DeepConf's token confidence (minus the mean of the top-k logprobs), both
x100 as integers, so that every confidence signal can be recomputed later.

Items come from two disjoint seeded sets: ``tuning`` (thresholds and temperatures are chosen on
it) and ``report`` (figures are reported on it, never tuned on). Resumable: one JSON line per
finished item, appended; a rerun skips the items already in the file. ``--chunk-s`` bounds a run
(vLLM's start included): no new item starts after it, so a chunk fits in a shared lock slot;
exit code 3 means items are left, 0 that the set is complete.

``--rescore`` (``loadtest/selection_rescore.py``, tables by ``selection_report.py``) re-scores every
selector from the stored file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from strategies.answers import extract, normalize  # noqa: E402
from strategies.sandbox import SandboxLimits, extract_code, run_python  # noqa: E402

# The prompt ``sharpen eval`` gives a reasoning-gym item (``evals.datasets.Item.prompt``), so that
# stored candidates and online runs through sharpen see the same question.
INSTRUCTION = "\nThink step by step, then end with a line 'The answer is X.'"
PAL_INSTRUCTION = ("\n\nDo not solve it by hand. Write a short Python program that computes the answer "
                   "and prints only the final answer. Reply with a single ```python code block.")
# basic_arithmetic's defaults (up to 6 terms of 4 digits) are out of a small model's reach.
TASK_CONFIG: dict[str, dict[str, Any]] = {"basic_arithmetic": {"min_terms": 2, "max_terms": 4, "max_digits": 2}}
SEEDS = {"pilot": 7, "tuning": 1001, "report": 2002}
HEAD, TAIL = 200, 700  # characters kept of a long candidate: the start, and the end where the answer is


@dataclass
class Item:
    """One reasoning-gym question with its dataset, for scoring any answer."""

    set: str
    task: str
    idx: int
    question: str
    gold: str
    entry: dict[str, Any] = field(repr=False)
    dataset: Any = field(repr=False)

    @property
    def key(self) -> str:
        return f"{self.set}:{self.task}:{self.idx}"

    def score(self, answer: str | None) -> int:
        """1 when the dataset's ``score_answer`` gives full marks or the normalised answers agree
        (extraction lower-cases words, "friday" for "Friday"), else 0; partial credit is 0."""
        if answer is None:
            return 0
        if normalize(answer) == normalize(self.gold):
            return 1
        try:
            return 1 if float(self.dataset.score_answer(answer, self.entry)) >= 1.0 else 0
        except Exception:
            return 0


def load_items(set_name: str, tasks: list[str], per_task: int, exclude: set[str] | None = None) -> list[Item]:
    """``per_task`` items per task from the set's seed; questions in ``exclude`` are skipped (the
    report set never repeats a tuning question)."""
    import reasoning_gym

    out: list[Item] = []
    for task in tasks:
        ds = reasoning_gym.create_dataset(task, seed=SEEDS[set_name], size=per_task + 20, **TASK_CONFIG.get(task, {}))
        got = 0
        for i in range(per_task + 20):
            e = ds[i]
            if exclude and e["question"] in exclude:
                continue
            out.append(Item(set_name, task, i, str(e["question"]), str(e["answer"]), e, ds))
            got += 1
            if got == per_task:
                break
    out.sort(key=lambda it: (it.idx, tasks.index(it.task)))  # interleaved: a prefix mixes the tasks
    return out


def token_stats(logprobs: dict[str, Any] | None) -> tuple[list[int], list[int]]:
    """Per token, x100 as integers: the chosen token's logprob, and DeepConf's token confidence
    (minus the mean logprob of the top-k alternatives; high when the model was sure)."""
    lp: list[int] = []
    conf: list[int] = []
    for t in (logprobs or {}).get("content") or []:
        lp.append(round(100 * max(float(t["logprob"]), -99.0)))
        tops = [max(float(a["logprob"]), -99.0) for a in t.get("top_logprobs") or []]
        conf.append(round(-100 * sum(tops) / len(tops)) if tops else 0)
    return lp, conf


def clip(text: str) -> str:
    return text if len(text) <= HEAD + TAIL + 20 else text[:HEAD] + "\n[...]\n" + text[-TAIL:]


async def execute(content: str, limits: SandboxLimits) -> dict[str, Any]:
    """The thin adapter over the sandbox: run the reply's Python block; what it printed is the
    answer. No code, a failure or a timeout abstains (answer None) with a reason."""
    code = extract_code(content)
    if code is None:
        return {"exec": "no_code", "answer": None}
    try:
        res = await run_python(code, limits)
    except Exception as exc:  # the sandbox itself failed: an abstention, never an error
        return {"exec": f"sandbox_error: {exc}"[:120], "answer": None}
    if res.timed_out:
        return {"exec": "timeout", "answer": None}
    if not res.ok:
        return {"exec": f"failed: {res.stderr.strip().splitlines()[-1:] or ''}"[:160], "answer": None}
    out = res.stdout.strip()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        return {"exec": "no_output", "answer": None}
    return {"exec": "ok", "answer": extract(lines[-1]), "stdout": out[-200:]}


# ---- generation ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def upstream_for(args: argparse.Namespace) -> AsyncIterator[str]:
    """``--upstream``, or the model started on the embedded vLLM with the project's backend code."""
    if args.upstream:
        yield args.upstream.rstrip("/")
        return
    from server.backend.vllm_process import VLLMProcess
    from server.backend.weights import prepare_model
    from server.settings import BackendSettings, Settings

    t0 = time.perf_counter()
    prepared = await asyncio.to_thread(prepare_model, args.model, Settings().cache_dir, python=sys.executable)
    settings = BackendSettings(model=args.model, kv_cache_gib=args.kv_cache_gib, start_timeout=900)
    log_path = Path(args.scratch) / f"vllm-{prepared.served_name}.log"
    async with VLLMProcess(settings, prepared, log_path, python=sys.executable) as proc:
        print(f"vLLM ready at {proc.base_url} in {time.perf_counter() - t0:.0f} s (log {log_path})", flush=True)
        yield proc.base_url


async def chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url + "/chat/completions", json=body) as r:
        data: dict[str, Any] = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {str(data)[:300]}")
    return data


def candidates(item: Item, data: dict[str, Any], *, pal: bool = False) -> list[dict[str, Any]]:
    out = []
    for ch in data["choices"]:
        content = ch["message"].get("content") or ""
        lp, conf = token_stats(ch.get("logprobs"))
        c: dict[str, Any] = {"text": clip(content), "finish": ch.get("finish_reason"), "tokens": len(lp),
                             "lp": lp, "conf": conf}
        if not pal:
            c["answer"] = extract(content)
            c["correct"] = item.score(c["answer"])
        out.append(c)
    return out


async def generate_item(session: aiohttp.ClientSession, url: str, model: str, item: Item,
                        args: argparse.Namespace) -> dict[str, Any]:
    base = {"model": model, "max_tokens": args.max_tokens, "logprobs": True, "top_logprobs": args.top_logprobs}
    prose = [{"role": "user", "content": item.question + INSTRUCTION}]
    t0 = time.perf_counter()
    calls = [chat(session, url, {**base, "messages": prose, "temperature": 0}),
             chat(session, url, {**base, "messages": prose, "temperature": args.temperature, "n": args.n})]
    if args.pal:
        calls.append(chat(session, url, {**base, "temperature": args.temperature, "n": args.pal,
                                         "messages": [{"role": "user", "content": item.question + PAL_INSTRUCTION}]}))
    res = await asyncio.gather(*calls)
    rec: dict[str, Any] = {"key": item.key, "set": item.set, "task": item.task, "idx": item.idx, "gold": item.gold,
                           "greedy": candidates(item, res[0])[0], "samples": candidates(item, res[1]),
                           "usage": [r.get("usage") for r in res]}
    if args.pal:
        pal = candidates(item, res[2], pal=True)
        limits = SandboxLimits(wall_s=5.0, cpu_s=3)
        runs = await asyncio.gather(*(execute(c.pop("full"), limits) for c in
                                      ({**c, "full": ch["message"].get("content") or ""}
                                       for c, ch in zip(pal, res[2]["choices"], strict=True))))
        for c, r in zip(pal, runs, strict=True):
            c.update(r)
            c["correct"] = item.score(c["answer"])
        rec["pal"] = pal
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            keys.add(json.loads(line)["key"])
    return keys


async def generate(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    # SIGTERM cancels the run, so that the vLLM child is stopped on the way out, not orphaned.
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    tasks = args.tasks.split(",")
    sets = args.sets.split(",")
    tuning_q = {it.question for it in load_items("tuning", tasks, args.tuning_per_task)} if "report" in sets else set()
    items: list[Item] = []
    for s in sets:
        per = {"pilot": args.pilot_per_task, "tuning": args.tuning_per_task, "report": args.report_per_task}[s]
        items += load_items(s, tasks, per, exclude=tuning_q if s == "report" else None)
    path = Path(args.gen)
    done = done_keys(path)
    todo = [it for it in items if it.key not in done]
    print(f"{len(items)} items, {len(done & {it.key for it in items})} done, {len(todo)} to do", flush=True)
    if not todo:
        return 0
    timeout = aiohttp.ClientTimeout(total=900)
    finished = 0
    async with upstream_for(args) as url, aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url + "/models") as r:
            model = str(next(c["id"] for c in (await r.json())["data"] if not c.get("parent")))
        queue = list(todo)
        with path.open("a") as out:  # noqa: ASYNC230 (one small append per item)

            async def worker() -> None:
                nonlocal finished
                while queue and time.monotonic() - t_start < args.chunk_s:
                    item = queue.pop(0)
                    try:
                        rec = await generate_item(session, url, model, item, args)
                    except Exception as exc:
                        print(f"  {item.key}: {exc!r}"[:300], flush=True)
                        continue
                    rec["model"] = model
                    out.write(json.dumps(rec, separators=(",", ":")) + "\n")
                    out.flush()
                    finished += 1
                    g = rec["greedy"]["correct"]
                    s = sum(c["correct"] for c in rec["samples"])
                    p = sum(c["correct"] for c in rec.get("pal", []))
                    print(f"  {item.key}: greedy {g}, samples {s}/{args.n}, pal {p}/{args.pal}, "
                          f"{rec['seconds']:.0f} s", flush=True)

            # Items still running at the hard stop are dropped (a later chunk redoes them), so a
            # chunk holds the shared lock for a bounded time.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.concurrency))),
                                       timeout=max(1.0, args.chunk_s + args.drain_s - (time.monotonic() - t_start)))
    left = len(todo) - finished
    print(f"chunk: {finished} items in {time.monotonic() - t_start:.0f} s; {left} left", flush=True)
    return 3 if left else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--online", type=int, default=0, help="run the shipped strategies on this many report items")
    ap.add_argument("--online-strategies", default="best_of_n,self_consistency")
    ap.add_argument("--online-out", default="/tmp/selection_bench/online.jsonl")
    ap.add_argument("--rescore", action="store_true")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--upstream", help="a running OpenAI-compatible server (.../v1) instead of embedded vLLM")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--tasks", default="gsm_symbolic,letter_counting,family_relationships")
    ap.add_argument("--sets", default="tuning,report")
    ap.add_argument("--pilot-per-task", type=int, default=5)
    ap.add_argument("--tuning-per-task", type=int, default=20)
    ap.add_argument("--report-per-task", type=int, default=50)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--pal", type=int, default=4, help="program-aided candidates per item (0: none)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-logprobs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=352)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--chunk-s", type=float, default=480, help="no new item starts after this many seconds")
    ap.add_argument("--drain-s", type=float, default=90, help="then at most this long for running items")
    ap.add_argument("--gen", default="/tmp/selection_bench/gen.jsonl", help="the per-item generation file")
    ap.add_argument("--scratch", default="/tmp/selection_bench")
    ap.add_argument("--out", default=str(ROOT / "loadtest" / "results"))
    args, rest = ap.parse_known_args()
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    if args.rescore:
        from loadtest.selection_report import main as rescore_main

        rescore_main(args, rest)
        return
    if rest:
        ap.error(f"unknown arguments: {rest}")
    if args.generate:
        # Only a generation writes --gen (a re-score takes a comma-separated list of them).
        Path(args.gen).parent.mkdir(parents=True, exist_ok=True)
        sys.exit(asyncio.run(generate(args)))
    if args.online:
        from loadtest.selection_online import online

        sys.exit(asyncio.run(online(args)))
    ap.error("--generate, --online or --rescore")


if __name__ == "__main__":
    main()
