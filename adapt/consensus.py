"""Training data from consensus: label each uncertain query (and, TT-SI-style, its synthesized
siblings) by the model's own vote, keep only clear majorities, and train on 1-4 of the model's
own rationales that reach the winning answer, easiest (highest vote share) first.

The held-out split is made by origin (a query and its siblings fall on the same side), so the
gate never scores a question whose rationales were trained on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from adapt.config import AdaptConfig
from adapt.data import Example, siblings
from adapt.labeller import Label, Labeller, keep
from protocol.errors import LabellingFailed, SharpenError
from protocol.events import Sample
from protocol.upstream import UpstreamAPI


@dataclass
class Labelled:
    """What labelling a cycle's queries gave: the kept labels and why the others were skipped."""

    kept: list[Label] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    questions: int = 0
    mean_share: float = 0.0  # over every labelled question: how sure the model was overall
    reused: int = 0  # candidates taken from the live requests instead of drawn again

    def summary(self) -> dict[str, object]:
        return {"questions": self.questions, "kept": len(self.kept), "skipped": dict(self.skipped),
                "mean_share": round(self.mean_share, 4), "reused_samples": self.reused,
                "rationalized": sum(lab.rationalized for lab in self.kept),
                "traced": sum(lab.traced > 0 for lab in self.kept),
                "kept_by_programs": sum(lab.program is not None for lab in self.kept)}


async def label_queries(upstream: UpstreamAPI, model: str, tenant: str, queries: list[tuple[int, str]],
                        labeller: Labeller, *, with_siblings: int = 0, min_share: float = 0.5,
                        min_confidence: float = 0.0, concurrency: int = 8,
                        priors: Mapping[int, Sequence[Sample]] | None = None,
                        rationales: int | None = None) -> Labelled:
    """Labels every query (and ``with_siblings`` synthesized siblings of each), a query with the
    candidates its live request drew (``priors`` by origin) counted as drawn, ``rationales``
    agreeing ones wanted per question (the labeller may stop once it has them); raises
    ``LabellingFailed`` when the upstream failed on every question or nothing was kept."""
    sem = asyncio.Semaphore(concurrency)

    async def expand(origin: int, task: str) -> list[tuple[int, str, bool]]:
        sibs: list[str] = []
        if with_siblings:
            async with sem:
                try:
                    sibs = await siblings(upstream, model, tenant, task, with_siblings)
                except SharpenError:
                    sibs = []  # the query itself is still labelled
        return [(origin, task, False)] + [(origin, s, True) for s in sibs]

    questions = [q for group in await asyncio.gather(*(expand(o, t) for o, t in queries)) for q in group]
    errors: list[str] = []

    async def one(origin: int, task: str, sib: bool) -> Label | None:
        async with sem:
            try:
                lab = await labeller.label(upstream, model, tenant, task, () if sib else (priors or {}).get(origin, ()),
                                           rationales)
            except SharpenError as exc:
                errors.append(exc.message)
                return None
            # A clear label none of whose own rationales finished: have the model work towards
            # it (STaR's rationalization) rather than lose the question; failing that, it is skipped.
            if keep(lab, min_share=min_share, min_confidence=min_confidence) == "no_finished_rationale":
                with contextlib.suppress(SharpenError):
                    lab.agreeing = await labeller.rationalize(upstream, model, tenant, lab)
                lab.rationalized = bool(lab.agreeing)
        lab.origin, lab.sibling = origin, sib
        return lab

    labels = await asyncio.gather(*(one(*q) for q in questions))
    out = Labelled(questions=len(questions))
    got = [lab for lab in labels if lab is not None]
    out.skipped["upstream_error"] = len(errors)
    if questions and not got:
        raise LabellingFailed(f"the model could not be labelled: all {len(questions)} labelling calls failed "
                              f"(last: {errors[-1] if errors else 'unknown'})")
    out.mean_share = sum(lab.share for lab in got) / len(got) if got else 0.0
    out.reused = sum(lab.reused for lab in got)
    for lab in got:
        reason = keep(lab, min_share=min_share, min_confidence=min_confidence)
        if reason is None:
            out.kept.append(lab)
        else:
            out.skipped[reason] += 1
    out.skipped = Counter({k: v for k, v in out.skipped.items() if v})
    if not out.kept:
        raise LabellingFailed(f"no question had a clear consensus ({len(questions)} labelled; skipped: "
                              f"{dict(out.skipped)})")
    return out


def split(kept: list[Label], holdout: float, seed: int = 0) -> tuple[list[Label], list[Label]]:
    """(train, held out), by origin: a query and its siblings stay together. At least one
    origin each side when there are two or more."""
    origins = sorted({lab.origin if lab.origin is not None else -1 - i for i, lab in enumerate(kept)})
    random.Random(seed).shuffle(origins)
    n = round(len(origins) * holdout)
    if len(origins) >= 2:
        n = min(max(n, 1), len(origins) - 1)
    held = set(origins[:n])

    def key(i: int, lab: Label) -> int:
        return lab.origin if lab.origin is not None else -1 - i

    return ([lab for i, lab in enumerate(kept) if key(i, lab) not in held],
            [lab for i, lab in enumerate(kept) if key(i, lab) in held])


def training_examples(labels: list[Label], rationales: int) -> list[Example]:
    """Up to ``rationales`` agreeing rationales per label, easy-to-hard: highest vote share
    first (then confidence), so a weak model sets its footing before the contested items."""
    ordered = sorted(labels, key=lambda lab: (-lab.share, -lab.confidence))
    return [Example(task=lab.task, answer=r, score=lab.share, origin=lab.origin, reference=lab.answer)
            for lab in ordered for r in lab.agreeing[:rationales]]


def heldout_examples(labels: list[Label]) -> list[Example]:
    """One gate item per held-out label: greedy must reach the pseudo-label."""
    return [Example(task=lab.task, answer="", score=lab.share, origin=lab.origin, reference=lab.answer)
            for lab in labels]


async def vote_accuracy(upstream: UpstreamAPI, model: str, tenant: str, labeller: Labeller,
                        items: list[Example]) -> float:
    """The labeller's vote (self-consistency@N) accuracy against ``items``' gold references."""
    try:
        labelled = await label_queries(upstream, model, tenant, [(i, e.task) for i, e in enumerate(items)],
                                       labeller, min_share=0.0, rationales=0)
    except LabellingFailed:
        return 0.0
    right = sum(1 for lab in labelled.kept if lab.origin is not None and lab.answer == items[lab.origin].reference)
    return right / len(items) if items else 0.0


async def vote_report(upstream: UpstreamAPI, model: str, tenant: str, labeller: Labeller,
                      items: list[Example]) -> dict[str, object]:
    """``{"vote_before": accuracy}`` of the labeller's vote on ``items``, or ``{"vote_error": why}``:
    a report figure, so a failure is noted rather than raised."""
    try:
        return {"vote_before": await vote_accuracy(upstream, model, tenant, labeller, items)}
    except Exception as exc:  # a cycle's verdict is reached before this runs; it must not undo it
        return {"vote_error": exc.message if isinstance(exc, SharpenError) else repr(exc)}


async def cycle_data(upstream: UpstreamAPI, model: str, tenant: str, queries: list[tuple[int, str]],
                     labeller: Labeller, s: AdaptConfig, report: dict[str, object],
                     heldout: list[Example] | None = None,
                     priors: Mapping[int, Sequence[Sample]] | None = None) -> tuple[list[Example], list[Example]]:
    """A cycle's (training examples, pseudo-labelled held-out items) from its queued queries
    (with their live candidates, ``priors``); the labelling summary goes into ``report``. A
    given ``heldout`` is used as it is."""
    labelled = await label_queries(upstream, model, tenant, queries, labeller,
                                   with_siblings=s.siblings if s.mode == "ttsi" else 0, min_share=s.min_share,
                                   min_confidence=s.min_confidence, priors=priors, concurrency=s.label_concurrency,
                                   rationales=s.rationales if s.label_early_stop else None)
    report["labelling"] = labelled.summary()
    train, held = split(labelled.kept, s.holdout_fraction) if heldout is None else (labelled.kept, [])
    return training_examples(train, s.rationales), heldout or heldout_examples(held)
