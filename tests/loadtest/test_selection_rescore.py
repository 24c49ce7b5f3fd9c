"""The offline re-scorer of the selection bench, on a hand-made generation record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest import selection_rescore as R
from strategies.confidence import TokenStats, measure


def _cand(answer: str | None, correct: int, lp: int, tokens: int = 10, finish: str = "stop") -> dict[str, Any]:
    text = f"Some steps.\nThe answer is {answer}." if answer is not None else "I do not know"
    return {"text": text, "finish": finish, "tokens": tokens, "lp": [lp] * tokens, "conf": [-lp * 2] * tokens,
            "answer": answer, "correct": correct}


def _record(key: str = "report:t:0") -> dict[str, Any]:
    samples = [_cand("5", 0, -120), _cand("5", 0, -110), _cand("5", 0, -130), _cand("7", 1, -5), _cand("7", 1, -8),
               _cand("x", 0, -1), _cand("9", 0, -200, finish="length"), _cand("5", 0, -150)]
    pal = [{**_cand(None, 0, -20), "answer": "7", "correct": 1, "exec": "ok"},
           {**_cand(None, 0, -20), "answer": None, "correct": 0, "exec": "failed"}]
    return {"key": key, "set": key.split(":")[0], "task": "t", "idx": 0, "gold": "7", "model": "m",
            "greedy": _cand("5", 0, -50), "samples": samples, "pal": pal,
            "usage": [{"prompt_tokens": 30}, {"prompt_tokens": 30}, {"prompt_tokens": 60}]}


@pytest.fixture
def rec(tmp_path: Path) -> R.Rec:
    path = tmp_path / "gen.jsonl"
    path.write_text(json.dumps(_record()) + "\n")
    (r,) = R.load([str(path)])
    return r


def test_placeholder_answers_are_re_read(rec: R.Rec) -> None:
    assert rec.samples[5].answer is None  # "The answer is x." copies the prompt's template
    assert rec.samples[6].rank > 0  # truncated


def test_selectors(rec: R.Rec) -> None:
    assert R.greedy(rec) == (0, 30 + 10)
    assert R.majority(rec)[0] == 0  # four 5s against two 7s
    assert R.oracle(rec)[0] == 1
    assert R.best_single(rec, "mean_logprob")[0] == 1  # the 7s are the surest well-formed ones
    assert R.policy(rec, "mean_logprob", 0.05)[0] == 1  # CISC: sure minority wins
    assert R.policy(rec, "mean_logprob", None)[0] == 0  # one vote each: the majority
    assert R.pal_alone(rec) == (1, 60 + 20)  # one run printed 7, the other abstained
    correct, tokens = R.policy(rec, "mean_logprob", 0.1, pal=True, boost=4.0)
    assert correct == 1 and tokens == 30 + 80 + 60 + 20
    assert R.deepconf(rec, "mean_logprob", 0.3)[0] == 1


def test_early_stopping_counts_the_prompt_per_wave(rec: R.Rec) -> None:
    correct, tokens = R.early_sc(rec, threshold=0.95, wave=2)
    assert tokens == 4 * 30 + 80  # never settles: four waves, the prompt counted each time
    assert correct == 0


def test_a_split_stops_early_and_the_most_confident_answers(rec: R.Rec) -> None:
    s = list(rec.samples)  # 5, 5, 5, 7, 7, x (placeholder), 9 (truncated), 5
    # waves of 3: 5, 5, 5 settle at P = 15/16 >= 0.6 (the split rule never looks)
    assert R.early_sc(rec, threshold=0.6, wave=3, split=3) == (0, 30 + 30)
    rec.samples = s[2:]  # 5, 7, 7 in the first wave: the 7s agree, P = 11/16
    assert R.early_sc(rec, threshold=0.6, wave=3, split=3)[0] == 1
    rec.samples = [s[3], s[5], s[6], s[3], s[4]]  # 7, x, 9 (truncated): no two usable answers agree
    assert R.early_sc(rec, threshold=None, wave=3, split=3) == (1, 30 + 10 * 3)  # split: stop after one wave
    # without the split rule, the waves continue until n
    assert R.early_sc(rec, threshold=None, wave=3)[1] == 2 * 30 + 10 * 5


def _prog(answer: str | None, correct: int) -> R.Cand:
    conf = measure(TokenStats((-0.2,) * 20, (0.4,) * 20))
    return R.Cand(answer, 0 if answer is not None else 9, correct, conf, 20)


def test_auto_programs_in_two_waves(rec: R.Rec) -> None:
    # the stored programs: 7 (right) and an abstention: one ran, so the probe settles
    assert R.auto_programs_first(rec, 2, 0.05, 0.5, more=2) == (1, 60 + 20)
    # 7 and 5 disagree; the second wave prints 5 and 5: 5 leads with three, the second call counted
    rec.pal = [_prog("7", 1), _prog("5", 0), _prog("5", 0), _prog("5", 0)]
    assert R.auto_programs_first(rec, 2, 0.05, 0.5, more=2) == (0, 2 * (60 + 40))
    # 7, 5, then 7, 5: a tie settles nothing, so the prose joins all four programs in the vote
    rec.pal = [_prog("7", 1), _prog("5", 0), _prog("7", 1), _prog("5", 0)]
    correct, tokens = R.auto_programs_first(rec, 2, 0.05, 0.5, n=6, more=2)
    assert tokens == 2 * (60 + 40) + 30 + 2 * 10  # two programs' calls, then one call of two prose
    assert correct == R.policy(rec, "mean_logprob", 0.05, boost=0.5, pal_k=4, n=6)[0]
    # two abstentions: programs do not apply, no second wave
    rec.pal = [_prog(None, 0), _prog(None, 0), _prog("7", 1), _prog("7", 1)]
    assert R.auto_programs_first(rec, 2, 0.05, 0.5, n=8, more=2)[1] == 60 + 40 + 30 + 6 * 10
    # never past n in all: with n = 3 the second wave is one program
    rec.pal = [_prog("7", 1), _prog("5", 0), _prog("7", 1), _prog("5", 0)]
    assert R.auto_programs_first(rec, 2, 0.05, 0.5, n=3, more=2) == (1, 2 * 60 + 60)
