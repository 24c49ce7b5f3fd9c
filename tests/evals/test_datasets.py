"""Loading eval datasets (JSONL and seeded reasoning-gym) and parsing ``--strategies``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evals.datasets import load
from evals.runner import StrategySpec, parse_strategies


def _write(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_ids_and_default_checkers(tmp_path: Path) -> None:
    path = _write(tmp_path / "items.jsonl", [
        {"id": "q1", "question": "What is 17*23?", "answer": "391"},
        {"question": "Which is prime?", "choices": ["4", "6", "7"], "answer": "C"},
        "",
        {"question": "Capital of France?", "answer": "Paris"},
        {"question": "How much?", "answer": "1,234.5"},
        {"id": 7, "question": "Write add.", "answer": "", "checker": "code", "tests": "assert add(1, 2) == 3"},
    ])
    items = load(str(path))
    assert [i.id for i in items] == ["q1", "2", "4", "5", "7"]  # missing ids are line numbers
    assert [i.checker for i in items] == ["numeric", "choice", "string", "numeric", "code"]
    assert items[1].choices == ["4", "6", "7"]
    assert items[4].tests == "assert add(1, 2) == 3"
    assert "C. 7" in items[1].prompt() and "The answer is X" in items[1].prompt()
    assert "```python" in items[4].prompt()
    assert [i.id for i in load(str(path), limit=2)] == ["q1", "2"]


@pytest.mark.parametrize(("bad", "needle"), [
    ({"question": "q", "answer": "1", "checker": "fuzzy"}, "unknown checker 'fuzzy'"),
    ({"question": "q", "answer": "1", "checker": "reasoning_gym"}, "unknown checker 'reasoning_gym'"),
    ('{"question": "q", "answer": ', "not JSON"),
    ({"answer": "1"}, "needs a 'question'"),
    ({"id": "a", "question": "q2", "answer": "2"}, "duplicate id 'a'"),
])
def test_bad_lines_name_the_line(tmp_path: Path, bad: dict[str, Any] | str, needle: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [{"id": "a", "question": "q", "answer": "1"}, "", bad])
    with pytest.raises(ValueError) as err:
        load(str(path))
    assert f"{path}:3:" in str(err.value)
    assert needle in str(err.value)


def test_reasoning_gym_is_seeded() -> None:
    a = load("basic_arithmetic", limit=4, seed=1)
    b = load("basic_arithmetic", limit=4, seed=1)
    c = load("basic_arithmetic", limit=4, seed=2)
    assert len(a) == 4
    assert [(i.id, i.question, i.answer) for i in a] == [(i.id, i.question, i.answer) for i in b]
    assert [i.question for i in a] != [i.question for i in c]
    assert all(i.checker == "reasoning_gym" and i.entry is not None and i.dataset is not None for i in a)
    assert len({i.id for i in a}) == 4


def test_plus_joins_datasets() -> None:
    items = load("basic_arithmetic+chain_sum", limit=4, seed=0)
    assert [i.id.rsplit("-", 2)[0] for i in items] == ["basic_arithmetic"] * 2 + ["chain_sum"] * 2
    assert len({i.id for i in items}) == 4
    # an odd limit is still honoured, split as evenly as it goes
    odd = load("basic_arithmetic+chain_sum", limit=5, seed=0)
    assert [i.id.rsplit("-", 2)[0] for i in odd] == ["basic_arithmetic"] * 3 + ["chain_sum"] * 2
    assert [i.question for i in odd[:2]] == [i.question for i in items[:2]]


def test_parse_strategies_types_options() -> None:
    specs = parse_strategies("passthrough,self_consistency:n=8,best_of_n:n=8,verifiers=approval+agreement")
    assert specs == [
        StrategySpec("passthrough", "passthrough", {}),
        StrategySpec("self_consistency:n=8", "self_consistency", {"n": 8}),
        StrategySpec("best_of_n:n=8,verifiers=approval+agreement", "best_of_n",
                     {"n": 8, "verifiers": ["approval", "agreement"]}),
    ]
    assert specs[0].body() == "passthrough"
    assert specs[2].body() == {"name": "best_of_n", "n": 8, "verifiers": ["approval", "agreement"]}
    (auto,) = parse_strategies(" auto:agree_threshold=1.01;probe_n=3;soft=false;verifier_model=judge ")
    assert auto.options == {"agree_threshold": 1.01, "probe_n": 3, "soft": False, "verifier_model": "judge"}
    assert isinstance(auto.options["probe_n"], int) and isinstance(auto.options["agree_threshold"], float)
