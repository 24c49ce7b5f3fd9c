"""Execution agreement: a prose answer that a program-aided candidate's executed result agrees
with is raised; one that disagrees is not. No upstream calls.

The executed answers come in ``task.options["executed"]`` (normalised answers of the programs
that ran and printed something; ``strategies.pal``). With none, every verdict abstains (score
None), so a failed or missing run never sinks a candidate.
"""

from __future__ import annotations

from strategies.base import StrategyContext
from strategies.verifiers.base import Verdict, VerificationTask, Verifier


class ExecutionAgreement(Verifier):
    """Score: the share of executed results that equal the candidate's answer."""

    name = "execution"

    async def score(self, task: VerificationTask, ctx: StrategyContext) -> list[Verdict]:
        executed = [a for a in task.options.get("executed") or [] if a is not None]
        if not executed:
            return [Verdict(None, detail="no program ran to completion") for _ in task.candidates]
        out = []
        for c in task.candidates:
            if c.answer is None:
                out.append(Verdict(0.0, approved=False, detail="no final answer found"))
                continue
            share = sum(a == c.answer for a in executed) / len(executed)
            out.append(Verdict(share, approved=share > 0, detail=f"{share:.2f} of {len(executed)} runs agree"))
        return out
