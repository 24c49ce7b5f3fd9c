"""Answer agreement: the share of candidates whose extracted final answer matches this one's."""

from __future__ import annotations

from collections import Counter

from strategies.base import StrategyContext
from strategies.verifiers.base import Verdict, VerificationTask, Verifier


class Agreement(Verifier):
    """Self-consistency as a verifier: free, and strong where answers are short and checkable."""

    name = "agreement"

    async def score(self, task: VerificationTask, ctx: StrategyContext) -> list[Verdict]:
        answers = [c.answer for c in task.candidates]
        counts = Counter(a for a in answers if a is not None)
        n = len(answers)
        out = []
        for a in answers:
            if a is None:
                out.append(Verdict(0.0, approved=False, detail="no final answer found"))
            else:
                share = counts[a] / n
                out.append(Verdict(share, approved=share > 0.5, detail=f"{counts[a]}/{n} agree on {a!r}"))
        return out
