"""Eval datasets: built-in reasoning-gym tasks (seeded), or a user's JSONL.

JSONL format, one item per line::

    {"id": "q1", "question": "What is 17*23?", "answer": "391", "checker": "numeric"}
    {"id": "q2", "question": "Which is a prime?", "choices": ["4", "6", "7"], "answer": "C", "checker": "choice"}
    {"question": "Write add(a, b).", "answer": "", "checker": "code", "tests": "assert add(2, 3) == 5"}

``checker`` is one of ``numeric`` (numbers with units and commas, ``\\boxed{}``), ``choice`` (option
letters), ``string`` (normalised text) or ``code`` (the answer's Python block must pass ``tests``
in the sandbox). Missing ids are numbered; a missing checker is ``numeric`` when the answer is a
number, else ``string``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "calendar_arithmetic")
CHECKERS = ("numeric", "choice", "string", "code", "reasoning_gym")


@dataclass
class Item:
    id: str
    question: str
    answer: str
    checker: str
    choices: list[str] | None = None
    tests: str | None = None
    entry: dict[str, Any] | None = field(default=None, repr=False)  # reasoning-gym's own entry
    dataset: Any = field(default=None, repr=False)

    def prompt(self) -> str:
        q = self.question
        if self.choices:
            q += "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(self.choices))
        if self.checker == "code":
            return q + "\nAnswer with a single ```python code block."
        return q + "\nThink step by step, then end with a line 'The answer is X.'"


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def load(spec: str, *, limit: int | None = None, seed: int = 0) -> list[Item]:
    """``spec`` is a JSONL path or a reasoning-gym dataset name (or several joined by '+')."""
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        return _jsonl(path, limit)
    items: list[Item] = []
    names = spec.split("+")
    per = None if limit is None else max(1, -(-limit // len(names)))  # ceil: --limit 5 over two gives 5
    for name in names:
        items += _reasoning_gym(name, per or 50, seed)
    return items[:limit] if limit else items


def _jsonl(path: Path, limit: int | None) -> list[Item]:
    items = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(d, dict) or "question" not in d:
            raise ValueError(f"{path}:{n}: an item needs a 'question'")
        answer = str(d.get("answer", ""))
        checker = d.get("checker") or ("choice" if d.get("choices") else "numeric" if _is_number(answer) else "string")
        if checker not in CHECKERS[:-1]:  # reasoning_gym needs a reasoning-gym entry, which JSONL lacks
            raise ValueError(f"{path}:{n}: unknown checker {checker!r} (one of {', '.join(CHECKERS[:-1])})")
        item_id = str(d.get("id", n))
        if item_id in seen:  # results are keyed by id: a repeat would overwrite the first's
            raise ValueError(f"{path}:{n}: duplicate id {item_id!r}")
        seen.add(item_id)
        items.append(Item(id=item_id, question=str(d["question"]), answer=answer, checker=checker,
                          choices=d.get("choices"), tests=d.get("tests")))
        if limit and len(items) >= limit:
            break
    return items


def _reasoning_gym(name: str, size: int, seed: int) -> list[Item]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset(name, seed=seed, size=size)
    out = []
    for i in range(size):
        e = ds[i]
        out.append(Item(id=f"{name}-{seed}-{i}", question=str(e["question"]), answer=str(e["answer"]),
                        checker="reasoning_gym", entry=e, dataset=ds))
    return out
