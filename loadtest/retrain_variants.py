"""Job files that retrain a later cycle's data two other ways, to measure what a second cycle
should start from (README, "Adaptation, eleventh measurement").

    .venv/bin/python loadtest/retrain_variants.py --first JOB_DIR --second JOB_DIR --out DIR
    .venv/bin/python -m adapt.train_worker DIR/fresh/job.json      # then, one at a time:
    .venv/bin/python -m adapt.train_worker DIR/replay/job.json
    .venv/bin/python loadtest/adapt_bench.py --adapter DIR/fresh/adapter --before ...   # measure each

``JOB_DIR`` is an ``adapt_bench`` cycle's job folder (``<scratch>/data-*/adapt/jobs/<id>``: its
``job.json`` and ``train.jsonl``). The second cycle ran live with ``--start-from`` the first's
registry (and ``--train-from current``: its adapter continued the first one). The variants,
with the second job's hyperparameters and a fresh LoRA from the base each:

- ``fresh``: the second cycle's examples alone, in their easy-to-hard order
  (``adapt.train_from: base``);
- ``replay``: both cycles' examples, shuffled (seed 0), the steps capped as a cycle's are.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def lines(job_dir: Path) -> list[str]:
    return [r for r in (job_dir / "train.jsonl").read_text().splitlines() if r.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--first", required=True, type=Path, help="the first cycle's job folder")
    ap.add_argument("--second", required=True, type=Path, help="the second cycle's job folder")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    job = json.loads((a.second / "job.json").read_text())
    both = lines(a.first) + lines(a.second)
    random.Random(0).shuffle(both)
    for name, rows, curriculum in (("fresh", lines(a.second), True), ("replay", both, False)):
        d = (a.out / name).absolute()
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.jsonl").write_text("\n".join(rows) + "\n")
        spec = dict(job, job_dir=str(d), examples=str(d / "train.jsonl"), out_dir=str(d / "adapter"),
                    parent_adapter=None, parent_adapter_path=None, hyper=dict(job["hyper"], curriculum=curriculum))
        (d / "job.json").write_text(json.dumps(spec))
        print(f"{name}: {len(rows)} examples -> {d / 'job.json'}")


if __name__ == "__main__":
    main()
