"""A regular expression the answer must match (``verifier_regex`` option)."""

from __future__ import annotations

import re

from strategies.base import StrategyContext
from strategies.verifiers.base import Verdict, VerificationTask, Verifier


class RegexMatch(Verifier):
    """Approves candidates whose content matches the request's pattern (``re.search``)."""

    name = "regex"

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    async def score(self, task: VerificationTask, ctx: StrategyContext) -> list[Verdict]:
        out = []
        for c in task.candidates:
            ok = self.pattern.search(c.content) is not None
            out.append(Verdict(1.0 if ok else 0.0, approved=ok))
        return out
