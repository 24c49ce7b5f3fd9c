"""Final-answer extraction and normalisation, shared by voting, verifiers and evaluation.

Tried in order: ``\\boxed{...}``, "the answer is ...", "Answer: ...", an option letter, the last
number, then the last non-empty line. Normalisation makes "1,000", "1000.0" and "$1000" agree.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*[:\s]*(.+)", re.IGNORECASE)
_OPTION = re.compile(r"^\(?([A-Ea-e])\)?[.):]?$")
_OPTION_IN = re.compile(r"\b(?:option|choice)\s*\(?([A-Ea-e])\)?\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_TRAILING = re.compile(r"[\s.。!,;:*]+$")


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else None


def normalize(ans: str) -> str:
    """A canonical form for comparing answers."""
    a = ans.strip().strip("*`$ ").rstrip(".")
    a = re.sub(r"^\\text\{(.*)\}$", r"\1", a)
    m = _OPTION.match(a)
    if m:
        return m.group(1).upper()
    num = a.replace(",", "").replace("$", "").strip()
    if re.fullmatch(r"-?\d+", num):
        return str(int(num))  # exact: float() would merge large integers
    try:
        f = float(num)
    except ValueError:
        f = math.nan
    if math.isfinite(f):  # "infinity" / "nan" stay words (int(inf) raises)
        return str(int(f)) if f == int(f) else repr(f)
    return re.sub(r"\s+", " ", a).lower()


def extract(text: str | None, *, last_line: bool = True) -> str | None:
    """The final answer in ``text``, normalised; None when nothing answer-like is found.
    ``last_line=False`` skips the last-line fallback (free-form text then yields None)."""
    if not text or not text.strip():
        return None
    boxed = _boxed(text)
    if boxed is not None and boxed.strip():
        return normalize(boxed)
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        last = matches[-1]
        # "the answer is 1, no, the answer is 2" on one line: the greedy tail swallowed the rest
        while (inner := _ANSWER_IS.search(text, last.start(1), last.end(1))) is not None:
            last = inner
        tail = last.group(1).strip().splitlines()[0] if last.group(1).strip() else ""
        tail = _TRAILING.sub("", tail)
        nums = _NUMBER.findall(tail)
        if nums and len(tail) > len(nums[0]) + 2 and not _OPTION.match(tail):
            return normalize(nums[0])  # "42 apples" -> 42
        if tail:
            return normalize(tail)
    opt = _OPTION_IN.findall(text)
    if opt:
        return str(opt[-1]).upper()
    nums = _NUMBER.findall(text)
    if nums:
        return normalize(nums[-1])
    if not last_line:
        return None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return normalize(lines[-1]) if lines else None


def majority(answers: list[str | None]) -> tuple[str | None, float]:
    """The most common extracted answer and its share of all candidates (0 when none parse)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0.0
    best, n = counts.most_common(1)[0]
    return best, n / len(answers)
