"""Offline re-scoring of every answer selector on the candidates ``selection_bench.py`` stored.

    .venv/bin/python loadtest/selection_bench.py --rescore --gen FILE[.gz] [--md OUT.md]

Each selector sees one item's stored candidates (greedy, N samples, K program-aided) and returns
an answer, whether it was right, and the tokens it would have cost. Parametrised selectors (vote
temperature, DeepConf's kept share, the execution boost, the stopping threshold) are tuned on
the ``tuning`` set only, by accuracy (ties: the first of the grid); every figure is on the
``report`` set: accuracy with a 95% Wilson interval per family and overall, exact paired
McNemar tests against greedy and against self-consistency@N, tokens per item.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from strategies import pal
from strategies import vote as V
from strategies.answers import FORM_NO_ANSWER, FORM_OK, final_answer, placeholders
from strategies.confidence import Confidence, TokenStats, measure
from strategies.selection import Ballot, WeightedVote
from strategies.verifiers.confidence import to_unit

TEMPLATES = placeholders("Think step by step, then end with a line 'The answer is X.'")
SIGNALS = ("mean_logprob", "mean_conf", "lowest_group", "tail")


@dataclass
class Cand:
    """One stored candidate, re-read: answer (re-extracted with the well-formedness rules),
    rank (well-formedness), right or wrong, confidence, tokens."""

    answer: str | None
    rank: int
    correct: int
    conf: Confidence
    tokens: int


@dataclass
class Rec:
    key: str
    set: str
    task: str
    greedy: Cand
    samples: list[Cand]
    pal: list[Cand]
    prompt_tokens: int
    pal_prompt_tokens: int
    raw: dict[str, Any] = field(repr=False)


@cache
def _dataset(set_name: str, task: str, size: int) -> Any:
    import reasoning_gym

    from loadtest.selection_bench import SEEDS, TASK_CONFIG

    return reasoning_gym.create_dataset(task, seed=SEEDS[set_name], size=size, **TASK_CONFIG.get(task, {}))


def _score(r: dict[str, Any], answer: str | None) -> int:
    """Scores an answer the generation pass did not see (re-extraction changed it)."""
    from loadtest.selection_bench import Item

    ds = _dataset(r["set"], r["task"], 200)
    e = ds[r["idx"]]
    assert str(e["answer"]) == r["gold"], "the dataset no longer reproduces the stored item"
    return Item(r["set"], r["task"], r["idx"], "", r["gold"], e, ds).score(answer)


def _cand(r: dict[str, Any], c: dict[str, Any], *, pal: bool = False) -> Cand:
    stats = TokenStats(tuple(x / 100 for x in c["lp"]), tuple(x / 100 for x in c["conf"]))
    if pal:
        answer, rank = c["answer"], (FORM_OK if c["answer"] is not None else 9)
        correct = c["correct"]
    else:
        answer, rank = final_answer(c["text"], c["finish"], TEMPLATES)
        correct = c["correct"] if answer == c["answer"] else (0 if answer is None else _score(r, answer))
    return Cand(answer, rank, correct, measure(stats), c["tokens"])


def load(paths: Iterable[str]) -> list[Rec]:
    recs: dict[str, Rec] = {}
    for p in paths:
        opener = gzip.open if p.endswith(".gz") else open
        with opener(p, "rt") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                u = r["usage"]
                pal = [_cand(r, c, pal=True) for c in r.get("pal", [])]
                recs[r["key"]] = Rec(r["key"], r["set"], r["task"], _cand(r, r["greedy"]),
                                     [_cand(r, c) for c in r["samples"]], pal,
                                     u[1]["prompt_tokens"], u[2]["prompt_tokens"] if len(u) > 2 else 0, r)
    return list(recs.values())


# ---- selectors: (record, params) -> (correct, tokens) ------------------------------------------


Pick = tuple[int, int]


def _sig(cs: list[Cand], signal: str) -> list[float | None]:
    return [c.conf.get(signal) for c in cs]


def _vote(cs: list[Cand], weights: list[float], *, quality: list[float | None] | None = None,
          mask: list[bool] | None = None, strict_form: bool = True) -> int:
    """The chosen candidate's correctness. ``strict_form``: malformed answers (truncated,
    code-only, recovered from an echoed template) vote only when no well-formed one does."""
    ok = [c.rank == FORM_OK for c in cs]
    m = list(mask) if mask is not None else [True] * len(cs)
    if strict_form and any(a and b and c.answer is not None for a, b, c in zip(ok, m, cs, strict=True)):
        m = [a and b for a, b in zip(ok, m, strict=True)]
    out = V.vote([c.answer for c in cs], weights, quality=quality, mask=m, rank=[c.rank for c in cs])
    return cs[out.index].correct if out.index is not None and out.answer is not None else 0


def _tok(r: Rec, cs: list[Cand], calls: int = 1) -> int:
    return calls * r.prompt_tokens + sum(c.tokens for c in cs)


def greedy(r: Rec) -> Pick:
    return r.greedy.correct, r.prompt_tokens + r.greedy.tokens


def first(r: Rec) -> Pick:
    return r.samples[0].correct, _tok(r, r.samples[:1])


def majority_plain(r: Rec) -> Pick:
    """Self-consistency as shipped: every extracted answer votes, placeholders included."""
    raw = r.raw["samples"]
    out = V.vote([c["answer"] for c in raw], V.weights_uniform(len(raw)))
    return (raw[out.index]["correct"] if out.index is not None and out.answer is not None else 0), _tok(r, r.samples)


def majority(r: Rec, k: int | None = None) -> Pick:
    """Self-consistency with the well-formedness rules (item 7); with ``k``, over the first k
    samples only, as one n=k call would have drawn them (what any stopping rule competes with)."""
    cs = r.samples[:k] if k else r.samples
    return _vote(cs, V.weights_uniform(len(cs))), _tok(r, cs)


def cisc(r: Rec, signal: str, temperature: float) -> Pick:
    s = _sig(r.samples, signal)
    return _vote(r.samples, V.weights_softmax(s, temperature), quality=s), _tok(r, r.samples)


def deepconf(r: Rec, signal: str, keep: float) -> Pick:
    """DeepConf offline: keep the most confident share, then a confidence-weighted vote."""
    s = _sig(r.samples, signal)
    lo = min((x for x in s if x is not None), default=0.0)
    w = [0.0 if x is None else x - lo + 1e-3 for x in s]  # confidence as weight, shifted positive
    return _vote(r.samples, w, quality=s, mask=V.keep_top(s, keep)), _tok(r, r.samples)


def borda(r: Rec, signal: str, power: float) -> Pick:
    s = _sig(r.samples, signal)
    return _vote(r.samples, V.weights_borda(s, power), quality=s), _tok(r, r.samples)


def best_single(r: Rec, signal: str) -> Pick:
    s = _sig(r.samples, signal)
    def key(j: int) -> tuple[int, float]:
        sj = s[j]
        return r.samples[j].rank, -(sj if sj is not None else -math.inf)

    i = min(range(len(r.samples)), key=key)
    return r.samples[i].correct, _tok(r, r.samples)


def pal_alone(r: Rec) -> Pick:
    k = len(r.pal)
    return _vote(r.pal, V.weights_uniform(k)), r.pal_prompt_tokens + sum(c.tokens for c in r.pal)


def pal_mix(r: Rec, boost: float, signal: str | None = None, temperature: float = 1.0) -> Pick:
    """Prose and executed answers in one vote: an executed answer weighs ``boost`` prose votes
    (the execution verifier's agreement boost), prose weights uniform or CISC."""
    n = len(r.samples)
    pw = [1.0] * n if signal is None else [x * n for x in V.weights_softmax(_sig(r.samples, signal), temperature)]
    cs = r.samples + r.pal
    return (_vote(cs, pw + [boost] * len(r.pal)),
            _tok(r, r.samples) + r.pal_prompt_tokens + sum(c.tokens for c in r.pal))


def early_sc(r: Rec, threshold: float | None, wave: int, signal: str | None = None, temperature: float = 1.0,
             split: int | None = None, tiebreak: str | None = None) -> Pick:
    """Self-consistency drawn in waves of ``wave`` (each wave one call: its prompt counts again),
    stopping once the Beta rule says the leader is settled, or (``split``) once that many answers
    are in and no two agree; then the vote (uniform or CISC), ties to the most confident by
    ``tiebreak`` (the online ``self_consistency`` with ``split_stop`` and ``signal``)."""
    drawn: list[Cand] = []
    calls = 0
    while len(drawn) < len(r.samples):
        drawn = r.samples[: len(drawn) + wave]
        calls += 1
        ok = [c.answer if c.rank == FORM_OK else None for c in drawn]
        if threshold is not None and V.should_stop(ok, threshold):
            break
        if split is not None and V.all_differ(ok, split):
            break
    if signal is None:
        correct = _vote(drawn, V.weights_uniform(len(drawn)), quality=_sig(drawn, tiebreak) if tiebreak else None)
    else:
        s = _sig(drawn, signal)
        correct = _vote(drawn, V.weights_softmax(s, temperature), quality=s)
    return correct, _tok(r, drawn, calls)


def auto(r: Rec, probe: int, min_conf: float | None, signal: str = "mean_logprob",
         temperature: float = 0.1) -> Pick:
    """``auto``: a probe of ``probe`` samples; unanimous and well-formed (and, with ``min_conf``,
    the probe's mean ``signal`` at least that) answers at once; else the rest are drawn (a second
    call) and all N go to the CISC vote."""
    cs = r.samples[:probe]
    answers = {c.answer for c in cs}
    conf = [c.conf.get(signal) for c in cs]
    sure = len(answers) == 1 and None not in answers and all(c.rank == FORM_OK for c in cs) and (
        min_conf is None or all(x is not None and x >= min_conf for x in conf))
    if sure:
        return cs[0].correct, _tok(r, cs)
    s = _sig(r.samples, signal)
    return _vote(r.samples, V.weights_softmax(s, temperature), quality=s), _tok(r, r.samples, 2)


def policy(r: Rec, signal: str, temperature: float | None, keep: float = 1.0, pal: bool = False,
           boost: float = 1.0, pal_k: int | None = None, n: int | None = None) -> Pick:
    """Exactly what the shipped strategies run (``strategies.selection.WeightedVote`` over the
    ``confidence`` verifier's score): so the figures for a default are the default's. ``pal_k``
    of ``n`` candidates program-aided (as ``best_of_n``'s ``pal`` option): the first ``n - pal_k``
    prose samples and the first ``pal_k`` programs."""
    if pal_k is not None:
        pal = pal_k > 0
        prose, progs = r.samples[: (n or len(r.samples)) - pal_k], r.pal[:pal_k]
    else:
        prose, progs = r.samples, (r.pal if pal else [])
    best = choose(prose + progs, progs, signal, temperature, keep, boost if pal else None)
    tokens = (_tok(r, prose) if prose else 0) + (r.pal_prompt_tokens + sum(c.tokens for c in progs) if progs else 0)
    return (best.correct if best is not None else 0), tokens


def choose(cs: list[Cand], progs: list[Cand], signal: str, temperature: float | None, keep: float = 1.0,
           boost: float | None = None) -> Cand | None:
    """``strategies.selection.WeightedVote`` over the candidates in this order (the ``confidence``
    verifier's score; ``boost``: the execution verifier's weight, None: no execution verifier, as
    in ``self_consistency``): the chosen candidate, None when no answer wins."""
    pal = boost is not None
    weights = {"confidence": 1.0} | ({"execution": boost} if pal else {})
    executed = [c.answer for c in progs if c.answer is not None]
    ballots = []
    for c in cs:
        v = c.conf.get(signal)
        scores: dict[str, float | None] = {"confidence": to_unit(signal, v) if v is not None else None}
        if pal:  # as ExecutionAgreement scores it: the share of executed results equal to the answer
            scores["execution"] = (None if not executed else
                                   sum(a == c.answer for a in executed) / len(executed) if c.answer else 0.0)
        ballots.append(Ballot(c.answer, c.rank if c.rank <= FORM_NO_ANSWER else FORM_NO_ANSWER, scores,
                              c.conf.mean_logprob))
    choice = WeightedVote(weights=weights, temperature=temperature, keep=keep).choose(ballots)
    return cs[choice.order[0]] if choice.order and choice.answer is not None else None


def sc_mix(r: Rec, pal_k: int, n: int = 8) -> Pick:
    """``self_consistency`` with ``pal: pal_k`` of ``n`` and no early stopping: one call of prose,
    one of programs, a plain majority (the shipped vote) over all of them."""
    prose, progs = r.samples[: n - pal_k], r.pal[:pal_k]
    best = choose(prose + progs, [], "mean_logprob", None)  # no execution verifier
    return (best.correct if best is not None else 0), _tok(r, prose) + r.pal_prompt_tokens + sum(
        c.tokens for c in progs)


def early_sc_programs_first(r: Rec, threshold: float, wave: int, pal_k: int, n: int = 8) -> Pick:
    """``self_consistency`` with ``pal: pal_k`` of ``n`` and early stopping, as shipped: the
    programs in waves of ``wave`` (each wave one call), then the prose in waves, stopping once the
    Beta rule says the leader is settled (an abstaining program does not vote); a plain majority
    over what was drawn, programs first."""
    assert len(r.pal) >= pal_k, "the stored item has fewer programs than the setting draws"
    drawn: list[Cand] = []
    tokens = 0

    def settled() -> bool:
        return V.should_stop([c.answer if c.rank == FORM_OK else None for c in drawn], threshold)

    for i in range(0, pal_k, wave):
        more = r.pal[i:min(i + wave, pal_k)]
        drawn += more
        tokens += r.pal_prompt_tokens + sum(c.tokens for c in more)
        if settled():
            break
    else:
        for i in range(0, n - pal_k, wave):
            more = r.samples[i:min(i + wave, n - pal_k)]
            drawn += more
            tokens += r.prompt_tokens + sum(c.tokens for c in more)
            if settled():
                break
    best = choose(drawn, [], "mean_logprob", None)  # no execution verifier: executed answers unused
    return (best.correct if best is not None else 0), tokens


def auto_pal(r: Rec, probe: int, pal_k: int, temperature: float | None, boost: float, n: int = 8) -> Pick:
    """``auto`` as shipped: a probe of ``probe`` prose samples answers at once when unanimous and
    well-formed; else the rest of the prose (a second call) and ``pal_k`` programs (a third) join
    best_of_n's vote (``policy`` with ``pal_k`` of ``n``)."""
    cs = r.samples[:probe]
    answers = {c.answer for c in cs}
    if len(answers) == 1 and None not in answers and all(c.rank == FORM_OK for c in cs):
        return cs[0].correct, _tok(r, cs)
    correct, tokens = policy(r, "mean_logprob", temperature, boost=boost, pal_k=pal_k, n=n)
    return correct, tokens + (r.prompt_tokens if n - pal_k > probe else 0)  # the top-up call's prompt


def auto_programs_first(r: Rec, pal_k: int, temperature: float | None, boost: float, n: int = 8,
                        more: int = 0) -> Pick:
    """``auto`` as shipped: ``pal_k`` program-aided candidates are the probe (one call); when
    every program that ran printed the same answer (at least one ran), that answer returns at
    once; when some ran but disagree, ``more`` further programs (a second call, never past ``n``)
    and an answer printed by at least two and by more than any other returns; else the other
    prose candidates (one more call) join best_of_n's vote with the programs (``policy`` with
    the programs drawn of ``n``)."""
    progs = r.pal[:pal_k]
    printed = [c.answer for c in progs if c.answer is not None]
    tokens = r.pal_prompt_tokens + sum(c.tokens for c in progs)
    if len(set(printed)) == 1:
        return next(c.correct for c in progs if c.answer is not None), tokens
    more = min(more, n - pal_k)
    if printed and more > 0:
        assert len(r.pal) >= pal_k + more, "the stored item has fewer programs than the setting draws"
        extra = r.pal[pal_k:pal_k + more]
        tokens += r.pal_prompt_tokens + sum(c.tokens for c in extra)
        progs = progs + extra
        answer = pal.leader([c.answer for c in progs], min_votes=2)
        if answer is not None:
            return next(c.correct for c in progs if c.answer == answer), tokens
    correct, total = policy(r, "mean_logprob", temperature, boost=boost, pal_k=len(progs), n=max(n, len(progs)))
    return correct, tokens + total - (r.pal_prompt_tokens + sum(c.tokens for c in progs))  # prompts as drawn


def oracle(r: Rec) -> Pick:
    return int(any(c.correct for c in r.samples)), _tok(r, r.samples)
