"""``loadtest/trace_rationales.py``: the programs' own majority as the label."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapt.trainer import TrainJob
from loadtest.trace_rationales import majority, write


def test_majority_needs_two_votes_and_more_than_half() -> None:
    assert majority(["42", "42", "7", None]) == "42"
    assert majority(["42", "7", None, None]) is None
    assert majority(["42", "42", "7", "7"]) is None
    assert majority([None, None]) is None


def test_the_job_file_is_one_the_trainer_reads(tmp_path: Path) -> None:
    args = argparse.Namespace(out=str(tmp_path / "out"), base_model_path="/models/base", learning_rate=1e-4,
                              max_steps=12)
    write(args, [{"messages": [{"role": "user", "content": "1 + 2 ="}], "answer": "x = 1 + 2\n= 3"}])
    job = TrainJob(**json.loads((tmp_path / "out" / "job.json").read_text()))
    assert job.examples == str(tmp_path / "out" / "train.jsonl") and job.out_dir == str(tmp_path / "out" / "adapter")
    assert job.hyper["learning_rate"] == 1e-4 and job.hyper["max_steps"] == 12 and job.hyper["curriculum"] is False
    assert json.loads((tmp_path / "out" / "train.jsonl").read_text())["answer"] == "x = 1 + 2\n= 3"
