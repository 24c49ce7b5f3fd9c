"""What ``adapt.scope: near`` would have done to measured cycles, re-scored offline from their stored answers.

    .venv/bin/python loadtest/adapter_scope.py --run NAME=JOB_DIR[+PARENT_JOB_DIR]=REPORT.json ...
        [--threshold 0.55] [--fpr-items 1000] [--out FILE.md]

For each run: the scope is the questions of the cycle's job folder (``train.jsonl`` and
``heldout.jsonl``, as the service writes it; a second cycle trained from a parent adds the
parent's, ``+PARENT_JOB_DIR``), embedded with the server's embedder (all-MiniLM-L6-v2). The
run's ``adapt_bench`` report holds, per item, the base model's and the adapter's greedy scores on
the unseen items of its family and on the unrelated family. With the scope, an item is answered
by the adapter when its question is within ``--threshold`` of the scope (with ``--coverage``, the
higher of that and ``adapt.scope.coverage_threshold`` of the run's scope: ``scope_threshold``), else by the base: its
score is one of the two stored ones, so no model runs here. Reported per run, with 95% Wilson
intervals and exact McNemar tests: the share of each set sent to the adapter, accuracy with and
without the scope, and the paired change against the base.

Then the false routing rate on a large sample of other reasoning-gym families (``--fpr-items``
each, seeds that no report uses): on the items never sent to the adapter the base answers, so
the scoped adapter cannot lose anything there; the share sent (with its 95% upper bound) bounds
what it could lose on such families, one point per item sent at most.

The threshold was chosen on tuning seeds (letter_counting seed 11 and other families' seed 7:
nearest other-family question 0.541, 1st percentile of the family's own 0.564), not on the
report's seeds (unseen 202, unrelated 404).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapt.scope import scope_threshold  # noqa: E402
from evals.report import mcnemar, wilson  # noqa: E402
from loadtest.adapt_bench import SEED_B, SEED_U, items  # noqa: E402
from loadtest.machine import cpu_line  # noqa: E402
from memory.embedder import MiniLMEmbedder  # noqa: E402

OTHER_FAMILIES = ["basic_arithmetic", "gsm_symbolic", "spell_backward", "count_bits", "family_relationships",
                  "word_sorting"]
FPR_SEED = 9090


def scope_questions(job_dirs: list[Path]) -> list[str]:
    out: list[str] = []
    for d in job_dirs:
        for name in ("train.jsonl", "heldout.jsonl"):
            f = d / name
            if f.is_file():
                rows = [json.loads(line) for line in f.read_text().splitlines() if line]
                out += [r["task"] if "task" in r else r["messages"][-1]["content"] for r in rows]
    return list(dict.fromkeys(out))


def rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({100 * k / n:.1f}%, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"


def acc(scores: list[float]) -> str:
    k, n = sum(scores), len(scores)
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"


def paired(other: list[float], base: list[float]) -> str:
    m = mcnemar(dict(enumerate(base)), dict(enumerate(other)))  # right = score >= 0.5, as everywhere
    return f"+{m['other_only']}/-{m['base_only']}, p={m['p_value']:.3g}"


def run_rows(name: str, scope: np.ndarray, report: dict[str, Any], emb: MiniLMEmbedder, thr: float,
             family: str, unrelated: str) -> list[str]:
    rows = []
    unseen_from = report["args"].get("unseen_from", 128)
    for label, fam, seed, key in ((f"unseen {family}", family, SEED_B, "family"),
                                  (f"unrelated {unrelated}", unrelated, SEED_U, "unrelated")):
        before, after = report["before"][key], report["after"][key]
        if not before or not after:
            continue
        its = [it for it in items(fam, len(before), seed, unseen_from=unseen_from)
               if it.id in before and it.id in after]
        sims = (emb.embed([it.prompt() for it in its]) @ scope.T).max(axis=1)
        routed = sims >= thr
        base = [float(before[it.id]) for it in its]
        adapted = [float(after[it.id]) for it in its]
        scoped = [a if r else b for a, b, r in zip(adapted, base, routed, strict=True)]
        rows.append(f"| {name} | {label} | {rate(int(routed.sum()), len(its))} | {acc(base)} | {acc(adapted)} "
                    f"({paired(adapted, base)}) | {acc(scoped)} ({paired(scoped, base)}) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=JOB_DIR[+PARENT_JOB_DIR]=REPORT.json")
    ap.add_argument("--threshold", type=float, default=0.55)
    ap.add_argument("--coverage", type=float, help="adapt.scope_coverage: each run's threshold raised to its scope's")
    ap.add_argument("--fpr-items", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    emb = MiniLMEmbedder(threads=2)
    lines = [f"CPU: {cpu_line()} (embedding only; the answers are the reports' stored ones)", "",
             f"threshold {a.threshold} (cosine, all-MiniLM-L6-v2)"
             + (f", raised per run to its scope's at coverage {a.coverage}" if a.coverage else ""), "",
             "| run | items | sent to the adapter | base greedy | adapter on all (vs base) | scoped (vs base) |",
             "|---|---|---|---|---|---|"]
    scopes, thresholds = [], {}
    for spec in a.run:
        name, dirs, report_file = spec.split("=")
        questions = scope_questions([Path(d) for d in dirs.split("+")])
        scope = emb.embed(questions)
        scopes.append((name, scope))
        thresholds[name] = thr = scope_threshold(scope, a.threshold, a.coverage)
        report = json.loads(Path(report_file).read_text())
        args = report["args"]
        lines += run_rows(f"{name} ({len(questions)} q., threshold {thr:.3f})", scope, report, emb, thr,
                          args["family"], args["unrelated"])
        print("\n".join(lines[-2:]), flush=True)
    lines += ["", f"Other families, {a.fpr_items} items each (seed {FPR_SEED}): sent to each run's adapter", "",
              "| family | " + " | ".join(n for n, _ in scopes) + " | nearest question (max over runs) |",
              "|---|" + "---|" * len(scopes) + "---|"]
    total = dict.fromkeys([n for n, _ in scopes], 0)
    count = 0
    for fam in OTHER_FAMILIES:
        its = items(fam, a.fpr_items, FPR_SEED)
        vecs = emb.embed([it.prompt() for it in its])
        count += len(its)
        cells, top = [], 0.0
        for n, scope in scopes:
            sims = (vecs @ scope.T).max(axis=1)
            k = int((sims >= thresholds[n]).sum())
            total[n] += k
            top = max(top, float(sims.max()))
            cells.append(str(k))
        lines.append(f"| {fam} | " + " | ".join(cells) + f" | {top:.3f} |")
        print(lines[-1], flush=True)
    lines.append("| all | " + " | ".join(rate(total[n], count) for n, _ in scopes) + " | |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
