"""The operator's labelled canary set (``adapt.canary``): JSONL of ``{"question": ..., "answer": ...}``.

The gate's held-out split is labelled by the same model it gates, so it cannot see a labeller
that is confidently wrong; the canary's gold answers can. A file that cannot be read fails the
cycle with the reason before anything is trained (and nothing queued is consumed).
"""

from __future__ import annotations

import json
from pathlib import Path

from adapt.data import Example
from protocol.errors import CanaryInvalid
from strategies.answers import normalize


def load(path: str | Path) -> list[Example]:
    """The canary items, each with its normalised gold answer as ``reference``."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CanaryInvalid(f"adapt.canary {p}: cannot be read ({exc})") from None
    out: list[Example] = []
    blank = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as exc:
            raise CanaryInvalid(f"adapt.canary {p}:{n}: not JSON ({exc})") from None
        if not isinstance(d, dict) or not isinstance(d.get("question"), str) or "answer" not in d:
            raise CanaryInvalid(f"adapt.canary {p}:{n}: an item needs a 'question' (text) and an 'answer'")
        ref = normalize(str(d["answer"])) if d["answer"] is not None else ""
        if not ref or not d["question"].strip():
            blank += 1  # counted: a file of nothing but these is refused below
            continue
        out.append(Example(task=d["question"], answer=str(d["answer"]), reference=ref))
    if not out:
        raise CanaryInvalid(f"adapt.canary {p}: no item with a question and a parseable answer "
                            f"({blank} without one)")
    return out
