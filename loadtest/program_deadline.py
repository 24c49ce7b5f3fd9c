"""What a deadline on best_of_n's programs would cost: can its wall time stay within 2.5x of one
``n=8`` call on short free-form answers without losing accuracy elsewhere?

    .venv/bin/python loadtest/program_deadline.py --calibrate [--upstream URL/v1]
    .venv/bin/python loadtest/program_deadline.py --gen A.jsonl.gz,B.jsonl.gz --fixed-s F --per-token-s T

``best_of_n`` (default 4 prose answers + 4 programs) makes two concurrent calls and waits for the
slower. On one-word answers (``family_relationships``) the prose call ends in ~1.3 s and the
programs' in 6-7 s (README, online check). A deadline of ``k`` x the prose call's time would
bound the wall time at about ``k`` x one ``n=8`` call; this re-scores the stored candidates of
``selection_bench.py`` as if the programs still running then were dropped, in two forms:
``whole`` (the program call cancelled: all four dropped) and ``finished`` (programs already done
kept; it needs a call per program or a streamed call).

Times come from a model, a call whose longest sequence is L tokens taking F + T x L seconds;
``--calibrate`` measures F and T on this CPU against the embedded vLLM (or ``--upstream``): two
concurrent ``n=4`` calls of exactly L tokens, as best_of_n makes, and one ``n=8`` call.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.machine import cpu_line  # noqa: E402
from loadtest.selection_rescore import Cand, Rec, choose, load  # noqa: E402
from strategies import best_of_n as bon  # noqa: E402

LENGTHS = (8, 32, 64, 128, 256)
PROMPT = "Name a family relationship (for example 'aunt'), then explain it."


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``seconds = F + T x tokens``: (F, T)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    t = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - t * mx, t


async def calibrate(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    import httpx

    from loadtest.selection_bench import upstream_for

    async with upstream_for(args) as url, httpx.AsyncClient(base_url=url, timeout=600) as c:
        model = next(str(m["id"]) for m in (await c.get("/models")).json()["data"] if not m.get("parent"))

        async def call(n: int, length: int) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "n": n, "temperature": 0.7,
                    "max_tokens": length, "min_tokens": length, "ignore_eos": True, "logprobs": True,
                    "top_logprobs": 5}
            (await c.post("/chat/completions", json=body)).raise_for_status()

        await call(8, 8)  # warm-up
        pair: list[tuple[int, float]] = []
        single: list[tuple[int, float]] = []
        for _ in range(args.repeats):
            for length in LENGTHS:
                t0 = time.perf_counter()
                await asyncio.gather(call(4, length), call(4, length))
                pair.append((length, time.perf_counter() - t0))
                t0 = time.perf_counter()
                await call(8, length)
                single.append((length, time.perf_counter() - t0))
    out = {"two n=4 calls": fit(pair), "one n=8 call": fit(single)}
    for name, (f, t) in out.items():
        print(f"{name}: {f:.3f} s + {t * 1000:.1f} ms per token", flush=True)
    return out


def prose_share(prose: list[Cand]) -> float:
    """The share of the prose answers that give the most common well-formed answer (0 when none)."""
    answers = [c.answer for c in prose if c.answer is not None and c.rank <= 0]
    return max(Counter(answers).values()) / len(prose) if answers else 0.0


def simulate(r: Rec, k: float | None, form: str, f: float, t: float, f8: float, t8: float,
             when: float = 0.0, answered: int = 0, ceiling: float | None = None) -> tuple[int, bool, float]:
    """(right, programs cut, modelled wall / one n=8 call) for ``best_of_n`` (4 prose, 4 programs)
    on ``r``; the deadline applies only where at least ``when`` of the prose answers agree and
    (form ``finished``) at least ``answered`` programs have printed an answer by then; where it
    does not, ``ceiling`` x the prose call cuts whatever is unfinished all the same."""
    n_prose = 8 - bon.PAL
    prose, progs = r.samples[:n_prose], r.pal[: bon.PAL]
    lp, lg = max(c.tokens for c in prose), max(c.tokens for c in progs)
    t_prose, t_prog = f + t * lp, f + t * lg
    applies = k is not None and prose_share(prose) >= when
    if applies and k is not None and answered:
        applies = sum(c.answer is not None and f + t * c.tokens <= k * t_prose for c in progs) >= answered
    deadline = k * t_prose if applies and k is not None else float("inf")
    if not applies and k is not None and ceiling is not None:
        deadline = ceiling * t_prose
    if form == "whole":
        use = progs if t_prog <= deadline else []
    else:
        use = [c for c in progs if f + t * c.tokens <= deadline]
    best = choose(prose + use, use, "mean_logprob", bon.VOTE_TEMPERATURE, 1.0,
                   bon.DEFAULT_WEIGHTS["execution"] if use else None)
    wall = max(t_prose, min(t_prog, deadline))
    ref = f8 + t8 * max(c.tokens for c in r.samples)
    return (best.correct if best is not None else 0), len(use) < len(progs), wall / ref


def table(recs: list[Rec], ks: list[float], f: float, t: float, f8: float, t8: float,
          whens: tuple[float, ...] = (0.0,), answered: int = 0, ceiling: float | None = None) -> str:
    fams = sorted({r.task for r in recs})
    head = "| deadline | " + " | ".join(f"{x} (n={sum(r.task == x for r in recs)})" for x in fams) + " | all |"
    lines = [head, "|" + "---|" * (len(fams) + 2)]
    forms = ("finished",) if answered else ("whole", "finished")  # answered: only finished programs are known
    runs = [(None, "none", 0.0)] + [(k, form, w) for w in whens for k in ks for form in forms]
    for k, form, when in runs:
        right: dict[str, int] = defaultdict(int)
        cut: dict[str, int] = defaultdict(int)
        ratio: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            ok, c, q = simulate(r, k, form, f, t, f8, t8, when, answered, ceiling)
            right[r.task] += ok
            cut[r.task] += c
            ratio[r.task].append(q)
        cells = [f"{right[x]} right, {cut[x]} cut, wall {statistics.median(ratio[x]):.2f}x / {max(ratio[x]):.2f}x"
                 for x in fams]
        total = sum(right.values())
        label = "none (waits for every program)" if k is None else f"{k}x the prose call, {form}" + (
            f", where >= {when:.0%} of the prose agree" if when else "") + (
            f", once >= {answered} program(s) printed an answer" if answered else "") + (
            f", else {ceiling:g}x" if ceiling is not None else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {total} ({total / len(recs):.1%}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--upstream")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--scratch", default="/tmp/program_deadline")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen", help="selection_bench generation files, comma-separated")
    ap.add_argument("--fixed-s", type=float, help="F for two concurrent n=4 calls")
    ap.add_argument("--per-token-s", type=float, help="T for two concurrent n=4 calls")
    ap.add_argument("--fixed8-s", type=float, help="F for one n=8 call (default: --fixed-s)")
    ap.add_argument("--per-token8-s", type=float, help="T for one n=8 call (default: --per-token-s)")
    ap.add_argument("--k", default="1.5,2,2.5,3")
    ap.add_argument("--when", default="0", help="prose agreement shares at which the deadline applies, comma-separated")
    ap.add_argument("--answered", type=int, default=0,
                    help="the deadline applies only once this many programs have printed an answer")
    ap.add_argument("--ceiling", type=float, help="where the deadline does not apply, cut at this multiple anyway")
    ap.add_argument("--md", help="write the table here as well")
    args = ap.parse_args()
    print(f"CPU: {cpu_line()}", flush=True)
    if args.calibrate:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        asyncio.run(calibrate(args))
        return
    if not (args.gen and args.fixed_s is not None and args.per_token_s is not None):
        ap.error("--calibrate, or --gen with --fixed-s and --per-token-s")
    recs = [r for r in load(args.gen.split(",")) if len(r.pal) >= bon.PAL and len(r.samples) >= 8]
    f8 = args.fixed8_s if args.fixed8_s is not None else args.fixed_s
    t8 = args.per_token8_s if args.per_token8_s is not None else args.per_token_s
    params: dict[str, Any] = {"F": args.fixed_s, "T": args.per_token_s, "F8": f8, "T8": t8}
    out = (f"best_of_n (4 prose + 4 programs) with a program deadline, {len(recs)} stored items; time model "
           f"{params}; wall as median / largest ratio to one n=8 call\n\n"
           + table(recs, [float(x) for x in args.k.split(",")], args.fixed_s, args.per_token_s, f8, t8,
                   tuple(float(x) for x in args.when.split(",")), args.answered, args.ceiling))
    print(out)
    if args.md:
        Path(args.md).write_text(f"CPU where this ran (calibrate F and T on the same host): {cpu_line()}\n\n{out}\n")


if __name__ == "__main__":
    main()
