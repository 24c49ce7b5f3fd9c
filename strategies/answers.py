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
_QUOTES = "\"' \u201c\u201d\u2018\u2019"  # straight and curly quotes
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
    a = ans.strip().strip("*`$ ").rstrip(".").strip(_QUOTES).rstrip(".")  # quoted answers: "tllet"
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


# ---- well-formedness: placeholders, truncated replies, code without an answer -----------------

# Answer templates a format instruction shows ("The answer is X.", "Answer: <answer>"); copied
# back, they are not answers. Bracketed forms are placeholders wherever they appear; a bare
# letter only when the prompt itself used it as the template.
_TEMPLATE_IN_PROMPT = re.compile(r"(?:answer|result)\s*(?:is|:|=)\s*['\"]?\s*([<\[{(]?[A-Za-z_ ]{1,20}[>\]})]?)",
                                 re.IGNORECASE)
_BRACKETED = re.compile(r"^[<\[{(][^<>\[\]{}()]{1,30}[>\]})]$")
_GENERIC = frozenset({"your answer", "final answer", "answer", "the answer", "...", "…", "number", "value"})
_FENCE = re.compile(r"```.*?(?:```|$)", re.DOTALL)

# Well-formedness ranks, best first: a vote returns a malformed reply only when no well-formed
# one shares its answer, and a malformed reply's answer does not vote (see ``rank``).
FORM_OK, FORM_TRUNCATED, FORM_CODE_ONLY, FORM_PLACEHOLDER, FORM_NO_ANSWER = range(5)


def placeholders(prompt: str | None) -> frozenset[str]:
    """The normalised templates the prompt's format instruction shows as the answer, e.g. "x" in
    "End with 'The answer is X.'" or "n" in "The answer is N"."""
    found = set()
    for m in _TEMPLATE_IN_PROMPT.finditer(prompt or ""):
        word = m.group(1).strip()
        # one template word ("X", "N", "<answer>"), not the start of a sentence ("is the sum of")
        if _BRACKETED.match(word) or (len(word) <= 2 and word.isalpha()) or word.isupper():
            found.add(normalize(word))
    return frozenset(found)


def is_placeholder(answer: str | None, templates: frozenset[str] = frozenset()) -> bool:
    """Whether ``answer`` (normalised) is a template copied from the instruction rather than an
    answer: one the prompt showed, a bracketed form ("<answer>"), or a generic word ("your answer")."""
    if answer is None:
        return False
    a = answer.strip().lower()
    return a in templates or bool(_BRACKETED.match(a)) or a in _GENERIC


def is_code_only(text: str | None) -> bool:
    """A reply that is code with no stated final answer outside its code blocks."""
    if not text or "```" not in text:
        return False
    prose = _FENCE.sub(" ", text)
    return extract(prose, last_line=False) is None


def form(text: str | None, answer: str | None, finish_reason: str | None,
         templates: frozenset[str] = frozenset()) -> int:
    """The well-formedness rank of a reply (``FORM_OK`` best). A reply cut by ``max_tokens``
    ("length") states no deliberate final answer: its last number is wherever the cut fell."""
    if answer is None:
        return FORM_NO_ANSWER
    if is_placeholder(answer, templates):
        return FORM_PLACEHOLDER
    if is_code_only(text):
        return FORM_CODE_ONLY
    if finish_reason == "length":
        return FORM_TRUNCATED
    return FORM_OK


def final_answer(text: str | None, finish_reason: str | None = "stop",
                 templates: frozenset[str] = frozenset()) -> tuple[str | None, int]:
    """The answer a vote should count for a reply, and its well-formedness rank: a placeholder
    is no answer; a truncated or code-only reply keeps its answer but ranks after the rest."""
    answer = extract(text)
    rank = form(text, answer, finish_reason, templates)
    if rank == FORM_PLACEHOLDER:
        # "... 5 + 3 = 8. The answer is X.": the template line was an echo; what the reasoning
        # reached before it may still count, ranked as unsure as a truncated reply.
        body = "\n".join(ln for ln in (text or "").splitlines()
                          if not is_placeholder(extract(ln, last_line=False), templates))
        rest = extract(body, last_line=False)
        return (None, FORM_PLACEHOLDER) if rest is None or is_placeholder(rest, templates) else (rest, FORM_TRUNCATED)
    return answer, rank
