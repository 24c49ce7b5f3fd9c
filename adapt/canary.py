"""The operator's labelled canary set (``adapt.canary``): JSONL of ``{"question": ..., "answer": ...}``.

The gate's held-out split is labelled by the same model it gates, so it cannot see a labeller
that is confidently wrong; the canary's gold answers can. A file that cannot be read fails the
cycle with the reason before anything is trained (and nothing queued is consumed).
"""

from __future__ import annotations

import json
from pathlib import Path

from adapt import consensus
from adapt.config import AdaptConfig
from adapt.data import Example
from adapt.gate import ItemScore
from adapt.labeller import Labeller
from protocol.errors import CanaryInvalid
from protocol.upstream import UpstreamAPI
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


class CanaryMemo:
    """What models already scored on the canary, reused by later cycles instead of asked again.

    Each gate scores the candidate and the current model on the canary, and the next cycle's
    current model is this cycle's candidate (promoted) or the same current model (rejected), so
    its canary answers are already known; the report's canary vote under the current model is too.
    Model names are never reused (adapter versions are immutable; the base keeps its served
    name), so a name, the canary's items and the settings that shape the answers identify them.
    Kept in memory: a restart, or a changed canary file or setting, measures again.
    """

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self.scores: dict[str, list[ItemScore]] = {}  # model -> its per-item canary scores
        self._votes: dict[str, dict[str, object]] = {}
        self._canary: list[Example] = []

    def under(self, canary: list[Example], s: AdaptConfig) -> CanaryMemo:
        """This memo for ``canary`` under the settings that shape its answers; emptied first
        when the items or any of those settings changed."""
        key = (tuple((e.task, e.reference) for e in canary), s.gate_max_tokens, s.gate_samples, s.label_temperature,
               s.label_n, s.label_pal, s.label_vote, s.label_max_tokens, s.label_rationalize)
        if key != self._key:
            self._key, self.scores, self._votes = key, {}, {}
            self._canary = canary
        return self

    async def vote(self, upstream: UpstreamAPI, model: str, tenant: str, labeller: Labeller) -> dict[str, object]:
        """The report's canary vote under ``model`` (``consensus.vote_report``), measured once
        per model; a failed measurement is not kept."""
        if model in self._votes:
            return dict(self._votes[model], vote_reused=True)
        got = await consensus.vote_report(upstream, model, tenant, labeller, self._canary)
        if "vote_before" in got:
            self._votes[model] = got
        return got
