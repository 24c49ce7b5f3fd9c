"""Calibrating from eval results: ``auto``'s probe threshold, and ``best_of_n``'s verifier
weights and vote temperature (``calibrate_weights``, see ``evals.fit_weights``).

Run the eval once with ``auto:pal=0,agree_threshold=1.01`` (the prose probe, which then always
escalates, so every item records both what the probe alone would have answered and what
best_of_n answered) plus the greedy baseline, then ``sharpen calibrate --results
DIR/results.jsonl``. For each candidate threshold it estimates accuracy and tokens had ``auto``
answered from the probe whenever the probe's agreement reached the threshold, and picks the
cheapest one that keeps ``gain`` of best_of_n's accuracy gain over greedy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evals.fit_weights import Scored, fit, pseudo_labels
from evals.report import read


def calibrate(results: Path, *, auto_label: str | None = None, greedy_label: str = "passthrough",
              gain: float = 0.9) -> dict[str, Any]:
    records = read(results)
    autos = [r for r in records if "probe_agreement" in r and (auto_label is None or r["strategy"] == auto_label)]
    if not autos:
        raise ValueError("no auto results with probe data: run the eval with "
                         "'auto:pal=0,agree_threshold=1.01'")
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


def calibrate_weights(results: Path, *, strategy: str | None = None, labelled: bool = True) -> dict[str, Any]:
    """Per-verifier weights and the vote temperature for ``best_of_n``, fitted on the candidates
    eval results recorded (run the eval with ``best_of_n`` naming the verifiers to weigh).
    ``labelled=False`` ignores correctness and fits to each item's majority answer instead
    (agreement between verifiers and the crowd, when no labels exist). Returns the fit and the
    config section the server loads (``strategies.options.best_of_n``)."""
    records = [r for r in read(results) if r.get("candidates") and (strategy is None or r["strategy"] == strategy)]
    if not records:
        raise ValueError("no results with per-candidate verdicts: run the eval with best_of_n and trace")
    items = [[Scored({k: v for k, v in c["scores"].items() if v is None or isinstance(v, int | float)},
                     c.get("answer"), float(c.get("correct") or 0.0) >= 1.0) for c in r["candidates"]]
             for r in records]
    if not labelled:
        items = pseudo_labels(items)
    names = sorted({k for it in items for c in it for k in c.scores})
    f = fit(items, names)
    chosen = [v for v in names if f.weights[v] > 0] or ["confidence"]
    section = {"verifiers": chosen, "weights": {v: round(f.weights[v], 4) for v in chosen},
               "vote_temperature": f.temperature}
    return {"items": f.items, "verifiers": names, "weights": f.weights, "vote_temperature": f.temperature,
            "training_accuracy": f.accuracy, "majority_accuracy": f.majority_accuracy, "labelled": labelled,
            "config": {"strategies": {"options": {"best_of_n": section}}}}
