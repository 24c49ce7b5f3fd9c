"""Sampling in waves with early stopping (Adaptive-Consistency, Aggarwal et al., arXiv 2305.11860).

Candidates are drawn ``wave`` at a time (one ``n=wave`` upstream call each) until ``n`` are drawn
or the leading answer is settled: P(leader beats the runner-up) under the Beta posterior
reaches ``threshold`` (``strategies.vote.should_stop``; only well-formed answers count), or, with
``split``, once that many candidates are in and no two answers agree (``strategies.vote.all_differ``:
the caller then answers with the most confident). Usage counts only what was drawn; the returned
trace lists every wave.

With ``programs``, the first waves are program-aided candidates (``strategies.pal.draw``: the programs run
in the sandbox, what they printed is their answer, an abstention does not vote). Executed answers
agree far more often than a weak model's prose ones, so the rule settles after fewer candidates
(``self_consistency`` draws its programs first when it stops early; README "Selection").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.wire import ChatCompletionRequest
from strategies import pal, sampling
from strategies.answers import FORM_OK
from strategies.base import Candidate, StrategyContext
from strategies.vote import all_differ, prob_leader_wins, should_stop, tally


@dataclass
class Drawn:
    """Every candidate drawn, one upstream-shaped answer holding all their choices (indices
    match the candidates'), and one trace entry per wave."""

    upstream: dict[str, Any]
    candidates: list[Candidate]
    waves: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    split: bool = False  # stopped because no two answers agreed


def settled(cands: list[Candidate]) -> float:
    """P(the leading well-formed answer beats the runner-up), 0 with no answer."""
    counts = sorted(tally([c.answer if c.form == FORM_OK else None for c in cands], [1.0] * len(cands)).values(),
                    reverse=True)
    if not counts:
        return 0.0
    return prob_leader_wins(int(counts[0]), int(counts[1]) if len(counts) > 1 else 0)


async def draw(request: ChatCompletionRequest, ctx: StrategyContext, n: int, temperature: float,
               notes: list[str], *, wave: int, threshold: float | None, split: int | None = None,
               first: tuple[dict[str, Any], list[Candidate]] | None = None, programs: int = 0) -> Drawn:
    """Up to ``n`` candidates in waves (``threshold`` and ``split`` None: one wave of ``n``).
    ``first``: a wave already drawn (``auto``'s probe), counted as the first. ``programs``: the
    first that many candidates are program-aided, drawn in their own waves before any prose."""
    if (threshold is None and split is None) or wave >= n:
        wave = n
    out = Drawn(first[0], list(first[1])) if first is not None else None
    if out is not None:
        out.waves.append(_entry(out.candidates, len(out.candidates)))
    while True:
        if out is not None:
            if len(out.candidates) >= n:
                break
            ok = [c.answer if c.form == FORM_OK else None for c in out.candidates]
            if threshold is not None and should_stop(ok, threshold):
                out.stopped_early = True
                notes.append(f"stopped after {len(out.candidates)} of {n} candidates: the leading answer is "
                             f"settled (P={settled(out.candidates):.3f} >= {threshold})")
                break
            if split is not None and all_differ(ok, split):
                out.stopped_early = out.split = True
                notes.append(f"stopped after {len(out.candidates)} of {n} candidates: no two of their answers "
                             "agree, the most confident answers")
                break
        have = len(out.candidates) if out else 0
        req = request if out is None else request.model_copy(update={"n": None})  # the client's n: checked once
        if have < programs:
            size = min(wave, programs - have)
            data, cands = await pal.draw(req, ctx, size, temperature, start=0)
        else:
            size = min(wave, n - have)
            purpose = "candidates" if out is None else f"candidates:wave{len(out.waves) + 1}"
            data, cands = await sampling.sample(req, ctx, size, temperature, notes if out is None else [],
                                                purpose=purpose)
        if out is None:
            out = Drawn(data, cands)
        else:
            _merge(out, data, cands)
        out.waves.append(_entry(out.candidates, size) | ({"programs": True} if have < programs else {}))
    return out


def _entry(cands: list[Candidate], size: int) -> dict[str, Any]:
    return {"drawn": size, "total": len(cands), "p_leader": round(settled(cands), 4)}


def _merge(out: Drawn, data: dict[str, Any], cands: list[Candidate]) -> None:
    """Appends a wave's choices and candidates, reindexed after those already held."""
    base = len(out.upstream["choices"])
    extra = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
    out.upstream = {**out.upstream, "choices": [*out.upstream["choices"],
                                                *(dict(c, index=base + i) for i, c in enumerate(extra))]}
    for c in cands:
        c.index += base
        out.candidates.append(c)
