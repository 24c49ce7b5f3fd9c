"""Calibrating ``auto``'s probe threshold from eval results.

Run the eval once with ``auto:agree_threshold=1.01`` (always escalates, so every item records
both what the probe alone would have answered and what best_of_n answered) plus the greedy
baseline, then ``sharpen calibrate --results DIR/results.jsonl``. For each candidate threshold it
estimates accuracy and tokens had ``auto`` answered from the probe whenever the probe's
agreement reached the threshold, and picks the cheapest one that keeps ``gain`` of best_of_n's
accuracy gain over greedy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evals.report import read


def calibrate(results: Path, *, auto_label: str | None = None, greedy_label: str = "passthrough",
              gain: float = 0.9) -> dict[str, Any]:
    records = read(results)
    autos = [r for r in records if "probe_agreement" in r and (auto_label is None or r["strategy"] == auto_label)]
    if not autos:
        raise ValueError("no auto results with probe data: run the eval with 'auto:agree_threshold=1.01'")
    greedy = {r["item"]: float(r["correct"]) for r in records if r["strategy"] == greedy_label}
    n = len(autos)
    bon_acc = sum(float(r["correct"]) for r in autos) / n
    bon_tokens = sum(r["tokens"] for r in autos) / n
    greedy_acc = sum(greedy.get(r["item"], 0.0) for r in autos) / n if greedy else None
    options = []
    for t in sorted({float(r["probe_agreement"]) for r in autos} | {1.01}):
        acc = tok = 0.0
        for r in autos:
            if float(r["probe_agreement"]) >= t:
                acc += float(r["probe_correct"])
                tok += r["probe_tokens"]
            else:
                acc += float(r["correct"])
                tok += r["tokens"]
        options.append({"agree_threshold": t, "accuracy": acc / n, "tokens_per_item": tok / n,
                        "token_share": (tok / n) / bon_tokens if bon_tokens else 0.0})
    floor = bon_acc if greedy_acc is None else greedy_acc + gain * (bon_acc - greedy_acc)
    ok = [o for o in options if o["accuracy"] >= floor - 1e-9]
    best = min(ok, key=lambda o: o["tokens_per_item"]) if ok else max(options, key=lambda o: o["accuracy"])
    return {"items": n, "best_of_n_accuracy": bon_acc, "greedy_accuracy": greedy_acc,
            "best_of_n_tokens_per_item": bon_tokens, "required_accuracy": floor, "choice": best,
            "options": options,
            "config": {"strategies": {"options": {"auto": {"agree_threshold": best["agree_threshold"]}}}}}
