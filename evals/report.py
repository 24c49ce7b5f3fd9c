"""Summaries of eval results: accuracy with a 95% Wilson interval, tokens per item, wall time and
upstream calls per strategy; a paired comparison against the baseline (exact McNemar); PNG plots
(accuracy against tokens, accuracy by uncertainty bucket); a Markdown report embedding them."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def read(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not r.get("error"):
            out.append(r)
    # a resumed run may hold an item twice: the last record wins
    last = {(r["strategy"], r["item"]): r for r in out}
    return list(last.values())


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def mcnemar(base: dict[str, float], other: dict[str, float]) -> dict[str, Any]:
    """Exact McNemar test on the items both strategies answered."""
    common = set(base) & set(other)
    b = sum(1 for i in common if base[i] >= 0.5 > other[i])  # baseline right, other wrong
    c = sum(1 for i in common if other[i] >= 0.5 > base[i])
    n = b + c
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)
    # Three significant digits, not four decimal places: a decisive result keeps its size (2e-9
    # is not 0.0).
    return {"items": len(common), "base_only": b, "other_only": c, "p_value": float(f"{p:.3g}")}


def summarize(records: list[dict[str, Any]], baseline: str | None) -> list[dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by[r["strategy"]].append(r)
    order = list(dict.fromkeys(r["strategy"] for r in records))
    base_scores = {r["item"]: float(r["correct"]) for r in by.get(baseline or "", [])}
    rows = []
    for s in order:
        rs = by[s]
        n = len(rs)
        k = sum(float(r["correct"]) for r in rs)
        lo, hi = wilson(k, n)
        row = {"strategy": s, "items": n, "accuracy": k / n if n else 0.0, "ci_low": lo, "ci_high": hi,
               "tokens_per_item": sum(r["tokens"] for r in rs) / n if n else 0.0,
               "calls_per_item": sum(r["calls"] for r in rs) / n if n else 0.0,
               "wall_s_per_item": sum(r["wall_s"] for r in rs) / n if n else 0.0}
        if baseline and s != baseline and base_scores:
            row["vs_baseline"] = mcnemar(base_scores, {r["item"]: float(r["correct"]) for r in rs})
        if any("escalated" in r for r in rs):
            row["escalated"] = sum(1 for r in rs if r.get("escalated")) / n
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = "| strategy | items | accuracy (95% CI) | tokens/item | calls/item | s/item | vs baseline |\n"
    head += "|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        vs = r.get("vs_baseline")
        vs_s = f"+{vs['other_only']}/-{vs['base_only']}, p={vs['p_value']}" if vs else "—"
        acc = f"{r['accuracy']:.1%} ({r['ci_low']:.1%} to {r['ci_high']:.1%})"
        lines.append(f"| {r['strategy']} | {r['items']} | {acc} | {r['tokens_per_item']:.0f} "
                     f"| {r['calls_per_item']:.1f} | {r['wall_s_per_item']:.1f} | {vs_s} |")
    return head + "\n".join(lines) + "\n"


def plots(records: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = sorted((r["tokens_per_item"], r["accuracy"], r["strategy"]) for r in rows)
    for x, y, s in pts:
        ax.scatter(x, y, label=s)
    front, best = [], -1.0
    for x, y, _ in pts:  # the Pareto front: no cheaper strategy is as accurate
        if y > best:
            front.append((x, y))
            best = y
    if front:
        ax.plot(*zip(*front, strict=True), linestyle="--", alpha=0.6)
    ax.set_xlabel("upstream tokens per item")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy against tokens (dashed: the Pareto front)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    p = out / "accuracy_vs_tokens.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p)

    fig, ax = plt.subplots(figsize=(6, 4))
    edges = [0, 0.2, 0.4, 0.6, 0.8, 1.0001]
    for s in dict.fromkeys(r["strategy"] for r in records):
        rs = [r for r in records if r["strategy"] == s and r.get("uncertainty") is not None]
        if not rs:
            continue
        xs, ys = [], []
        for lo, hi in itertools.pairwise(edges):
            b = [r for r in rs if lo <= r["uncertainty"] < hi]
            if b:
                xs.append((lo + min(hi, 1.0)) / 2)
                ys.append(sum(float(r["correct"]) for r in b) / len(b))
        ax.plot(xs, ys, marker="o", label=s)
    ax.set_xlabel("uncertainty (bucket mid-point)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy by uncertainty")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "accuracy_by_uncertainty.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p)
    return files


def write(results: Path, out: Path, baseline: str | None, title: str) -> dict[str, Any]:
    records = read(results)
    rows = summarize(records, baseline)
    pngs = plots(records, rows, out)
    md = [f"# {title}", "", table(rows), ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return {"rows": rows, "plots": [str(p) for p in pngs], "report": str(out / "report.md")}
