"""Scoring an answer against an item: exact numeric, option letter, normalised string, code
tests in the sandbox, or reasoning-gym's own scorer."""

from __future__ import annotations

import re

from evals.datasets import Item
from strategies.answers import extract, normalize
from strategies.sandbox import SandboxLimits, extract_code, run_python

_LETTER = re.compile(r"\b([A-J])\b")


def final_answer(text: str) -> str | None:
    """What the model answered, extracted the way strategies vote on it."""
    return extract(text)


def numeric(text: str, expected: str) -> bool:
    got = extract(text)
    return got is not None and got == normalize(expected)


def choice(text: str, expected: str, choices: list[str] | None) -> bool:
    got = extract(text)
    want = expected.strip().upper()
    if got is not None and got.upper() == want:
        return True
    if choices and got is not None:  # the model wrote the option's text instead of its letter
        for i, c in enumerate(choices):
            if normalize(c) == got and chr(65 + i) == want:
                return True
    return False


def string(text: str, expected: str) -> bool:
    got = extract(text)
    return got is not None and got == normalize(expected)


async def code(text: str, tests: str | None) -> bool:
    src = extract_code(text)
    if src is None or not tests:
        return False
    result = await run_python(src + "\n\n" + tests, SandboxLimits(wall_s=10, cpu_s=10))
    return result.ok


async def score(item: Item, text: str) -> float:
    if item.checker == "numeric":
        return float(numeric(text, item.answer))
    if item.checker == "choice":
        return float(choice(text, item.answer, item.choices))
    if item.checker == "string":
        return float(string(text, item.answer))
    if item.checker == "code":
        return float(await code(text, item.tests))
    # reasoning-gym scores the extracted final answer with its own (task-aware) rules
    got = extract(text) or ""
    raw = re.search(r"answer is[:\s]*(.+?)\.?\s*$", text.strip(), re.IGNORECASE | re.MULTILINE)
    candidates = [got] + ([raw.group(1).strip()] if raw else [])
    best = 0.0
    for c in candidates:
        try:
            best = max(best, float(item.dataset.score_answer(answer=c, entry=item.entry)))
        except Exception:  # a scorer that chokes on odd text scores it 0
            continue
    return best
