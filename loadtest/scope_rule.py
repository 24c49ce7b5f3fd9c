"""How ``adapt.scope_coverage`` moves an adapter's scope, against the fixed threshold alone: no model runs.

    .venv/bin/python loadtest/scope_rule.py [--train 36] [--train-seed 7] [--own 150] [--others 300] [--near 1000]
        [--coverage 0.9 --coverage 0.95 ...] [--outside NAME=TRAIN=UNSEEN ...] [--out FILE.md]

For each reasoning-gym family as an adapter's (``FAMILIES``): ``--train`` of its questions (tuning
seed ``TRAIN_SEED``) stand for the questions it was trained on; then the share of ``--own``
unseen ones of the same family (seed ``OWN_SEED``) each rule sends to it (what the scope should
keep: the adapter's gain is made there) and of ``--others`` of every other family (seed
``OTHER_SEED``; what it should not take). Rules: the fixed ``adapt.scope_similarity`` (0.55)
alone, and the higher of it and ``adapt.scope.coverage_threshold`` at each ``--coverage``.
Everything is embedded as the server does (all-MiniLM-L6-v2, the prompt as sent).

``--outside`` applies the same rules, untuned, to a scope from outside reasoning-gym: an
adapter's training questions (a cycle's job folder ``DIR/``, its ``train.jsonl`` and
``heldout.jsonl`` as the service writes them, or a question/answer ``FILE.jsonl[:FIRST:END]``)
and unseen questions of its task (``FILE.jsonl[:FIRST:END]``), against the same other families
plus ``--near`` items of ``basic_arithmetic`` (seed 9090, as ``loadtest/adapter_scope.py``).

The training questions here are drawn at random; a cycle's are the queued (unsure) ones, a
biased sample of the family, which the ``--outside`` rows with a real job folder show.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapt.scope import scope_threshold  # noqa: E402
from evals.datasets import load  # noqa: E402
from evals.report import wilson  # noqa: E402
from loadtest.adapt_bench import items  # noqa: E402
from loadtest.adapter_scope import FPR_SEED, scope_questions  # noqa: E402
from loadtest.machine import cpu_line  # noqa: E402
from memory.embedder import MiniLMEmbedder  # noqa: E402

FAMILIES = ["basic_arithmetic", "chain_sum", "products", "letter_counting", "gsm_symbolic", "spell_backward",
            "count_bits", "family_relationships", "word_sorting"]
TRAIN_SEED, OWN_SEED, OTHER_SEED = 7, 8, 9  # tuning seeds: no report uses them
FLOOR = 0.55  # adapt.scope_similarity's default


def share(sims: np.ndarray, thr: float) -> str:
    k, n = int((sims >= thr).sum()), len(sims)
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"


def nearest(vecs: np.ndarray, scope: np.ndarray) -> np.ndarray:
    out: np.ndarray = (vecs @ scope.T).max(axis=1)
    return out


def rule_rows(name: str, scope: np.ndarray, own: np.ndarray, others: dict[str, np.ndarray],
              coverages: list[float | None]) -> list[str]:
    """One row per rule: the threshold, the share of the own family sent, the share of every
    other family sent (all together, and the worst one)."""
    rows = []
    own_s = nearest(own, scope)
    other_s = {f: nearest(v, scope) for f, v in others.items()}
    for cov in coverages:
        thr = scope_threshold(scope, FLOOR, cov)
        worst = max(other_s, key=lambda f: float((other_s[f] >= thr).mean()))
        pooled = np.concatenate(list(other_s.values()))
        rows.append(f"| {name} | {'fixed' if cov is None else cov} | {thr:.3f} | {share(own_s, thr)} | "
                    f"{share(pooled, thr)} | {worst} {share(other_s[worst], thr)} |")
    return rows


def outside_questions(spec: str) -> list[str]:
    """A job folder's questions (``DIR/``) or a JSONL's prompts (``FILE.jsonl[:FIRST:END]``: rows FIRST to END - 1)."""
    spec, _, rows = spec.partition(":")
    path = Path(spec)
    if spec.endswith("/") or path.is_dir():
        return scope_questions([path])
    first, _, end = rows.partition(":")
    its = load(str(path))
    return [it.prompt() for it in its[int(first or 0):int(end) if end else None]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=36)
    ap.add_argument("--train-seed", type=int, default=TRAIN_SEED, help="another draw of the training questions")
    ap.add_argument("--own", type=int, default=150)
    ap.add_argument("--others", type=int, default=300)
    ap.add_argument("--near", type=int, default=1000)
    ap.add_argument("--coverage", type=float, action="append")
    ap.add_argument("--outside", action="append", default=[], help="NAME=TRAIN(.jsonl or job DIR/)=UNSEEN.jsonl")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    coverages: list[float | None] = [None, *(a.coverage or [0.9, 0.95, 0.98])]
    emb = MiniLMEmbedder(threads=2)
    lines = [f"CPU: {cpu_line()} (embedding only)", "",
             f"{a.train} training questions per family (seed {a.train_seed}), {a.own} unseen of the same family "
             f"(seed {OWN_SEED}), {a.others} of each other family (seed {OTHER_SEED}); floor {FLOOR}", "",
             "| adapter's family | rule (coverage) | threshold | own family sent | other families sent | "
             "most sent other family |", "|---|---|---|---|---|---|"]
    vec = {f: emb.embed([it.prompt() for it in items(f, a.train, a.train_seed)]) for f in FAMILIES}
    own = {f: emb.embed([it.prompt() for it in items(f, a.own, OWN_SEED)]) for f in FAMILIES}
    other = {f: emb.embed([it.prompt() for it in items(f, a.others, OTHER_SEED)]) for f in FAMILIES}
    for fam in FAMILIES:
        lines += rule_rows(fam, vec[fam], own[fam], {f: v for f, v in other.items() if f != fam}, coverages)
        print("\n".join(lines[-len(coverages):]), flush=True)
    if a.outside:
        near = emb.embed([it.prompt() for it in items("basic_arithmetic", a.near, FPR_SEED)])
        lines += ["", f"From outside (not tuned on), against every family above and {a.near} `basic_arithmetic` "
                      f"(seed {FPR_SEED}):", "",
                  "| scope | rule (coverage) | threshold | own unseen sent | other families sent | "
                  "most sent other family |", "|---|---|---|---|---|---|"]
        for spec in a.outside:
            name, train, unseen = spec.split("=")
            scope = emb.embed(list(dict.fromkeys(outside_questions(train))))
            others = dict(other) | {f"basic_arithmetic ({a.near})": near}
            lines += rule_rows(f"{name} ({scope.shape[0]} q.)", scope, emb.embed(outside_questions(unseen)),
                               others, coverages)
            print("\n".join(lines[-len(coverages):]), flush=True)
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
