"""Pseudo-labels from consensus (TTRL, arXiv 2504.16084): N candidates from one ``n=N`` call with
logprobs, grouped by final answer; the winning group's answer is the label, its share and
confidence say how far to trust it, and its members are the model's own agreeing rationales.

``Labeller`` is the extension point (a confidence-weighted vote can replace ``MajorityVote``
without touching the cycle); ``keep`` is the one place the thresholds are applied.
"""

from __future__ import annotations

import abc
import asyncio
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from adapt.config import AdaptConfig
from protocol.events import Sample
from protocol.upstream import UpstreamAPI
from protocol.wire import ChatCompletionRequest
from strategies import pal, sampling, trace
from strategies.base import Candidate, StrategyContext


@dataclass
class Label:
    """The consensus over one question's candidates.

    ``answer`` is the winning normalised final answer (None when no candidate had one);
    ``share`` its fraction of all N candidates (of the programs that ran, when they decided);
    ``confidence`` in [0, 1] (here the winners'
    mean per-token probability); ``agreeing`` the finished rationales that reach ``answer``,
    most confident first; ``disagreeing`` the finished ones that reach another answer."""

    task: str
    answer: str | None
    share: float
    confidence: float
    n: int
    agreeing: list[str] = field(default_factory=list)
    disagreeing: list[str] = field(default_factory=list)
    origin: int | None = None  # the queued query this question came from (itself or a sibling)
    sibling: bool = False
    program: str | None = None  # the executed programs' agreed answer, when it is the label (else None)
    reused: int = 0  # candidates taken from the live request rather than drawn again
    rationalized: bool = False  # ``agreeing`` was written with the answer as a hint (STaR)
    traced: int = 0  # of ``agreeing``, the programs' working (``strategies.trace``), listed first


class Labeller(abc.ABC):
    """Labels one question by the model's own consensus.

    Contract: ``label`` makes its upstream calls through the given upstream (one ``n=N`` call is
    the norm), returns a ``Label`` whatever the candidates say (no winner: ``answer`` None and
    ``share`` 0), and raises ``protocol.errors.SharpenError`` only when the upstream fails.
    ``prior`` are candidates ``model`` already drew for ``task`` alone (the live request's): a
    labeller may count them as its own draws and draw only the rest. ``rationales`` is how many
    agreeing rationales the caller will use (0: the answer alone; None: as many as ``n`` gives):
    a labeller may stop drawing once the answer is settled and that many are in hand."""

    n: int

    @abc.abstractmethod
    async def label(self, upstream: UpstreamAPI, model: str, tenant: str, task: str,
                    prior: Sequence[Sample] = (), rationales: int | None = None) -> Label:
        """The consensus label of ``task`` under ``model``."""

    async def rationalize(self, upstream: UpstreamAPI, model: str, tenant: str, label: Label) -> list[str]:
        """Rationales for a kept label that none of its own candidates finished (STaR's
        rationalization): finished ones that reach ``label.answer``, most confident first. The
        reference implementation writes none."""
        return []


# A rationale that refers to the hint teaches the model to expect one: such rationales are dropped.
_MENTIONS_HINT = re.compile(r"\bhint\b|\bgiven answer\b|\breference answer\b|\bcorrect (?:final )?answer is\b"
                            r"|\bthe working reaches\b", re.I)  # the last: the hint's own words echoed


def hinted(task: str, answer: str) -> str:
    """STaR's rationalization prompt: the question with its label given, for a worked solution."""
    return (f"{task}\n\n(Hint: the correct final answer is {answer}. Solve the problem step by step so that "
            f"the working reaches {answer}; do not mention this hint. End with 'The answer is {answer}'.)")


class MajorityVote(Labeller):
    """Majority vote over ``n`` samples; confidence is exp(mean token logprob) of the winners.

    With ``pal`` > 0, that many program-aided candidates (``strategies.pal``: the model writes
    Python, the sandbox runs it) are drawn too, and their printed answers vote beside the prose
    ones. With ``programs_decide`` (the default), programs that ran and agree set the label alone
    (the PAL paper's observation that executed programs make better labels); otherwise all
    answers pool. Neither is better everywhere (``loadtest/label_precision.py``, on the queries the
    live path queues): the 0.5B's agreeing programs are right on 67 of 68 such labels on
    arithmetic and letter counting but 17 of 28 on word problems, where the pooled vote is
    right on 11 of 11. The rationales trained on are the prose ones that reach the label; with
    ``traces``, first the working of the agreeing programs (``strategies.trace``: their
    arithmetic written out one operation at a time, as they ran), where the label is theirs."""

    def __init__(self, n: int = 8, *, temperature: float = 0.8, max_tokens: int = 256, pal: int = 0,
                 rationalize: int = 0, programs_decide: bool = True, traces: bool = False) -> None:
        self.n = n
        self.pal = pal
        self.traces = traces
        self.programs_decide = programs_decide
        self.hints = rationalize  # hinted samples drawn by ``rationalize`` (0: none)
        self.temperature = temperature
        self.max_tokens = max_tokens

    @classmethod
    def configured(cls, config: AdaptConfig) -> MajorityVote:
        """The labeller ``adapt.label_*`` describe."""
        return cls(config.label_n, temperature=config.label_temperature, max_tokens=config.label_max_tokens,
                   pal=config.label_pal, rationalize=config.label_rationalize,
                   programs_decide=config.label_vote == "programs", traces=config.label_traces)

    def _ask(self, upstream: UpstreamAPI, model: str, tenant: str,
             content: str) -> tuple[ChatCompletionRequest, StrategyContext]:
        """The request (one user message, the labeller's sampling settings) and its context."""
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        ctx = StrategyContext(upstream=upstream, body=body, endpoint="/chat/completions", model=model,
                              tenant=tenant, deadline=time.monotonic() + 900)
        return ChatCompletionRequest.model_validate(body), ctx

    async def label(self, upstream: UpstreamAPI, model: str, tenant: str, task: str,
                    prior: Sequence[Sample] = (), rationales: int | None = None) -> Label:
        req, ctx = self._ask(upstream, model, tenant, task)
        # The live request's candidates are samples of the same question and model, already paid
        # for: they count towards n (and pal), and only the shortfall is drawn.
        had = [Candidate(index=i, content=p.content, answer=p.answer, finish_reason=p.finish_reason,
                         logprob=p.logprob, program=p.program) for i, p in enumerate(prior)]
        cands = [c for c in had if not c.program][: self.n]
        programs = [c for c in had if c.program][: self.pal]
        reused = len(cands) + len(programs)
        # Programs first: where they run and agree they decide the label whatever the prose says,
        # so the prose still to draw is needed only for rationales (none, for an answer alone).
        if len(programs) < self.pal:
            programs += (await pal.draw(req, ctx, self.pal - len(programs), self.temperature, start=len(had)))[1]
        lab = vote(task, cands, programs, programs_decide=self.programs_decide)
        # The agreeing programs' working is worked out once (it does not change the vote) and
        # only where rationales are wanted; it can settle the question before any prose is drawn.
        worked = await self._worked(programs, lab.program) if rationales != 0 else []
        lab = _with(lab, worked)
        settled = rationales is not None and lab.program is not None and len(lab.agreeing) >= rationales
        if len(cands) < self.n and not settled:
            cands += (await sampling.sample(req, ctx, self.n - len(cands), self.temperature, []))[1]
            lab = _with(vote(task, cands, programs, programs_decide=self.programs_decide), worked)
        lab.reused = reused
        return lab

    async def _worked(self, programs: list[Candidate], answer: str | None) -> list[str]:
        """The working of the programs that printed ``answer`` (the programs' agreed answer),
        those that reach it again when traced; none without ``traces`` or an agreed answer."""
        if not self.traces or answer is None:
            return []
        got = await asyncio.gather(*(trace.worked_out(c.content) for c in programs if c.answer == answer))
        return list(dict.fromkeys(text for text, printed in got if text is not None and printed == answer))

    async def rationalize(self, upstream: UpstreamAPI, model: str, tenant: str, label: Label) -> list[str]:
        """``rationalize`` samples of the question with the label as a hint (one ``n=k`` call);
        those that finish, reach the label and do not mention the hint are the rationales."""
        if not self.hints or label.answer is None:
            return []
        req, ctx = self._ask(upstream, model, tenant, hinted(label.task, label.answer))
        cands = (await sampling.sample(req, ctx, self.hints, self.temperature, [], purpose="rationalize"))[1]
        good = sorted((c for c in cands if c.finish_reason == "stop" and c.answer == label.answer
                       and not _MENTIONS_HINT.search(c.content)), key=_prob, reverse=True)
        return list(dict.fromkeys(c.content for c in good))


def _with(lab: Label, worked: list[str]) -> Label:
    """``lab`` with the programs' ``worked`` rationales first, where its answer is theirs."""
    if worked and lab.program is not None and lab.answer == lab.program:
        lab.agreeing = list(dict.fromkeys([*worked, *lab.agreeing]))
        lab.traced = len(worked)
    return lab


def _prob(c: Candidate) -> float:
    return math.exp(c.logprob) if c.logprob is not None else 0.0


def vote(task: str, cands: list[Candidate], programs: list[Candidate] | None = None, *,
         programs_decide: bool = True) -> Label:
    """The label of ``cands`` and ``programs``. With ``programs_decide``, programs that ran and
    agree on one answer (a strict majority of those that ran) decide it and the share is theirs;
    otherwise (or when they split) every answer that ran is one vote, ties going to the more
    confident group, and the share is the winner's fraction of those votes."""
    ran = [c.answer for c in programs or [] if c.answer is not None]
    top = Counter(ran).most_common(2)
    program = top[0][0] if top and (len(top) == 1 or top[0][1] > top[1][1]) else None
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for c in [*cands, *(programs or [])]:
        if c.answer is not None:
            groups[c.answer].append(c)
    total = len(cands) + len(ran)  # a program that did not run abstains: it is no vote at all
    if not groups:
        return Label(task=task, answer=None, share=0.0, confidence=0.0, n=total)
    best = program if programs_decide and program is not None else \
        max(groups, key=lambda a: (len(groups[a]), sum(map(_prob, groups[a])) / len(groups[a])))
    decided = programs_decide and best == program
    won = groups[best]
    prose = [c for c in won if not c.program]
    # A rationale cut off by max_tokens is no example to imitate, whatever its answer.
    finished = sorted((c for c in prose if c.finish_reason == "stop"), key=_prob, reverse=True)
    others = [c.content for a, g in groups.items() if a != best for c in g if c.finish_reason == "stop"
              and not c.program]
    # Decided by programs, the share is theirs (how settled the executed answer is); else the vote's.
    share = Counter(ran)[best] / len(ran) if decided else len(won) / total
    return Label(task=task, answer=best, share=share,
                 confidence=sum(map(_prob, prose or won)) / len(prose or won), n=total,
                 agreeing=list(dict.fromkeys(c.content for c in finished)), disagreeing=others,
                 program=program if program == best else None)


def keep(label: Label, *, min_share: float, min_confidence: float) -> str | None:
    """Why ``label`` is skipped (None: keep it). Without a clear majority a weak model would
    only learn its own noise (arXiv 2511.04902)."""
    if label.answer is None:
        return "no_answer"
    if label.share < min_share:
        return "no_majority"
    if label.confidence < min_confidence:
        return "low_confidence"
    if not label.agreeing:
        return "no_finished_rationale"
    return None
