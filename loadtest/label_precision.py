"""How often the adaptation labeller's labels are right, on stored candidates (offline, no model).

    .venv/bin/python -m loadtest.label_precision [GEN.jsonl.gz ...] [--md OUT.md]

The consensus labeller (``adapt.labeller.vote`` and ``keep``, the shipped functions) is run on
the candidates ``selection_bench.py`` stored per item: 8 prose samples (T=0.7) and up to 4
program-aided ones (executed), with the gold answer beside them. The live path queues only the
queries its request was unsure of (``adapt.uncertainty_threshold``: self-consistency over 4
samples with a winning share <= 0.5); the first 4 stored samples stand in for that request, so
each item is counted as queued or not by them. Per vote rule (``programs``: executed programs
that agree decide the label; ``pooled``: prose and program answers vote together), number of
programs and minimum share, it prints the labels kept, how many are right (95% Wilson
interval), how many correct an item the model's greedy answer gets wrong (what training could
teach), and how many are wrong (what it would teach wrongly).

Caveats: the stored samples were drawn with the eval's prompt and max_tokens 320-352; the
labeller draws with its own (``label_max_tokens`` 256). The ranking of rules is what to read.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapt.labeller import keep, vote  # noqa: E402
from evals.report import wilson  # noqa: E402
from loadtest.selection_rescore import Rec, load  # noqa: E402
from strategies.base import Candidate  # noqa: E402

DEFAULT = [str(ROOT / "loadtest/results/selection_bench-qwen2.5-coder-0.5b-gsm_symbolic-gen.jsonl.gz"),
           str(ROOT / "loadtest/results/selection_bench-qwen2.5-coder-0.5b-gen.jsonl.gz")]


def _cands(r: Rec, k: int, *, programs: bool) -> list[Candidate]:
    raw = r.raw["pal" if programs else "samples"]
    cs = r.pal if programs else r.samples
    return [Candidate(index=i, content=raw[i]["text"], answer=c.answer, finish_reason=raw[i]["finish"],
                      logprob=c.conf.mean_logprob, program=programs) for i, c in enumerate(cs[:k])]


def queued(r: Rec) -> bool:
    """Whether the live request (SC over the first 4 samples) was unsure enough to queue."""
    answers = [c.answer for c in r.samples[:4] if c.answer is not None]
    share = Counter(answers).most_common(1)[0][1] / 4 if answers else 0.0
    return share <= 0.5


def measure(recs: list[Rec], *, rule: str, pal: int, min_share: float) -> Counter[str]:
    c: Counter[str] = Counter()
    for r in recs:
        lab = vote(r.key, _cands(r, 8, programs=False), _cands(r, pal, programs=True) if pal else None,
                   programs_decide=rule == "programs")
        if keep(lab, min_share=min_share, min_confidence=0.0) is not None:
            continue
        right = next((s.correct for s in [*r.samples, *r.pal] if s.answer == lab.answer), 0)
        c["kept"] += 1
        c["right"] += right
        c["corrective"] += bool(right and not r.greedy.correct)
        c["wrong"] += not right
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gen", nargs="*", default=DEFAULT)
    ap.add_argument("--md", help="also write the table here")
    a = ap.parse_args()
    recs = load(a.gen)
    bands = {"queued": [r for r in recs if queued(r)], "all": recs}
    lines = [f"{len(recs)} items ({', '.join(f'{t} {n}' for t, n in Counter(r.task for r in recs).most_common())}); "
             f"queued by the live rule: {len(bands['queued'])}",
             "",
             "| items | vote rule | programs | min share | kept | right (95% CI) | corrective | wrong |",
             "|---|---|---|---|---:|---|---:|---:|"]
    for band, rs in bands.items():
        for rule in ("programs", "pooled"):
            for pal in (2, 4):
                for share in (0.5, 0.625):
                    c = measure(rs, rule=rule, pal=pal, min_share=share)
                    lo, hi = wilson(c["right"], c["kept"])
                    prec = f"{c['right']} = {100 * c['right'] / c['kept']:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%)" \
                        if c["kept"] else "-"
                    lines.append(f"| {band} ({len(rs)}) | {rule} | {pal} | {share} | {c['kept']} | {prec} | "
                                 f"{c['corrective']} | {c['wrong']} |")
    lines += ["", "Queued items by family (4 programs, min share 0.5):", "",
              "| family | queued | vote rule | kept | right (95% CI) | corrective | wrong |",
              "|---|---:|---|---:|---|---:|---:|"]
    for task, _ in Counter(r.task for r in bands["queued"]).most_common():
        rs = [r for r in bands["queued"] if r.task == task]
        for rule in ("programs", "pooled"):
            c = measure(rs, rule=rule, pal=4, min_share=0.5)
            lo, hi = wilson(c["right"], c["kept"])
            prec = f"{c['right']} ({100 * lo:.0f}-{100 * hi:.0f}%)" if c["kept"] else "-"
            lines.append(f"| {task} | {len(rs)} | {rule} | {c['kept']} | {prec} | {c['corrective']} | {c['wrong']} |")
    out = "\n".join(lines)
    print(out)
    if a.md:
        Path(a.md).write_text(out + "\n")


if __name__ == "__main__":
    main()
