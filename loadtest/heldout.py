"""A held-out comparison on a set the project does not contain (GSM8K's test split, BIG-Bench-Hard
tasks; from outside).

    # 1. the items: GSM8K's test.jsonl (github.com/openai/grade-school-math,
    #    grade_school_math/data/test.jsonl), shuffled with a fixed seed, the first N
    .venv/bin/python loadtest/heldout.py build --src test.jsonl --out /tmp/gsm8k-150.jsonl [--n 150]
    #    or BIG-Bench-Hard task files (github.com/suzgunmirac/BIG-Bench-Hard, bbh/<task>.json):
    #    N of each, shuffled per task, then interleaved so a stopped run covers every task alike
    .venv/bin/python loadtest/heldout.py build --src bbh/object_counting.json \
        --src bbh/multistep_arithmetic_two.json --out /tmp/bbh-300.jsonl
    # 2. the run (item by item, each strategy in turn, so a stopped run stays paired)
    .venv/bin/sharpen eval --dataset /tmp/gsm8k-150.jsonl --strategies passthrough,auto --out /tmp/heldout
    # 3. the paired summary, and a copy without the questions' text to commit
    .venv/bin/python loadtest/heldout.py summary /tmp/heldout/results.jsonl [--keep results.jsonl]

The questions stay out of the repository: only ids, correctness, tokens and times are kept.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.report import mcnemar, wilson  # noqa: E402
from loadtest.machine import cpu_line  # noqa: E402

KEEP = ("strategy", "item", "expected", "correct", "answer", "tokens", "prompt_tokens", "completion_tokens",
        "calls", "wall_s")


def _items(src: Path, n: int, seed: int) -> list[dict[str, str]]:
    """The first ``n`` items of one source after a seeded shuffle: GSM8K's JSONL (the answer
    after '####') or a BIG-Bench-Hard task file (``{"examples": [{"input", "target"}]}``)."""
    if src.suffix == ".json":
        rows = json.loads(src.read_text())["examples"]
        random.Random(seed).shuffle(rows)
        return [{"id": f"bbh-{src.stem}-{i}", "question": r["input"], "answer": str(r["target"]).strip()}
                for i, r in enumerate(rows[:n])]
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return [{"id": f"gsm8k-test-{i}", "question": r["question"],
             "answer": str(r["answer"]).split("####")[-1].strip().replace(",", "")} for i, r in enumerate(rows[:n])]


def build(srcs: list[Path], out: Path, n: int, seed: int) -> int:
    per = [_items(src, n, seed) for src in srcs]
    with out.open("w") as f:
        for i in range(max(len(p) for p in per)):  # interleaved: item i of each source in turn
            for p in per:
                if i < len(p):
                    f.write(json.dumps(p[i]) + "\n")
    print(f"{sum(len(p) for p in per)} items -> {out} (seed {seed})")
    return 0


def family(item: str) -> str:
    """The task an item id names (``bbh-object_counting-3`` -> ``object_counting``); every
    other id is one family (GSM8K's, or a hand-made set's)."""
    if item.startswith("bbh-"):
        return item.removeprefix("bbh-").rsplit("-", 1)[0]
    return "gsm8k" if item.startswith("gsm8k-") else "items"


def summary(results: Path, baseline: str, keep: Path | None) -> int:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    families = sorted({family(r["item"]) for r in rows})
    print(f"CPU: {cpu_line()}")
    table(rows, baseline, "all")
    if len(families) > 1:
        for fam in families:
            table([r for r in rows if family(r["item"]) == fam], baseline, fam)
    if keep is not None:
        with keep.open("w") as f:
            for r in rows:
                f.write(json.dumps({k: r.get(k) for k in KEEP}) + "\n")
        print(f"kept (no question text): {keep}")
    return 0


def table(rows: list[dict[str, Any]], baseline: str, title: str) -> None:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["item"], {})[r["strategy"]] = r
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    items = [k for k, v in by.items() if len(v) == len(strategies)]  # paired: every strategy answered
    n = len(items)
    if not n:
        print(f"{title}: no item has an answer from every strategy")
        return
    print(f"\n{title}: {n} items answered by every strategy ({', '.join(strategies)})")
    print("| strategy | accuracy (95% CI) | vs " + baseline + " | tokens/item | median wall s |")
    print("|---|---|---|---:|---:|")
    for s in strategies:
        right = [bool(by[i][s]["correct"]) for i in items]
        lo, hi = wilson(sum(right), n)
        t = mcnemar({i: by[i][baseline]["correct"] for i in items}, {i: by[i][s]["correct"] for i in items})
        pv = "p<1e-4" if t["p_value"] < 1e-4 else f"p={t['p_value']:.2g}"
        versus = "-" if s == baseline else f"+{t['other_only']}/-{t['base_only']}, {pv}"
        tokens = sum(by[i][s]["tokens"] for i in items) / n
        wall = sorted(by[i][s]["wall_s"] for i in items)[n // 2]
        print(f"| {s} | {sum(right) / n:.1%} ({lo:.1%}-{hi:.1%}) | {versus} | {tokens:.0f} | {wall:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--src", type=Path, action="append", required=True, help="repeat: items interleaved")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--n", type=int, default=150)
    b.add_argument("--seed", type=int, default=20261203)
    s = sub.add_parser("summary")
    s.add_argument("results", type=Path)
    s.add_argument("--baseline", default="passthrough")
    s.add_argument("--keep", type=Path, default=None)
    a = ap.parse_args()
    sys.exit(build(a.src, a.out, a.n, a.seed) if a.cmd == "build" else summary(a.results, a.baseline, a.keep))


if __name__ == "__main__":
    main()
