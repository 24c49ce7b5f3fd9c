"""``auto``: spend compute only where it pays.

A cheap probe (``probe_n`` samples in one ``n`` call) measures answer agreement and the mean
token logprob. If the probe agrees enough, its majority answer is returned at once; otherwise
the request escalates to ``best_of_n``, which draws only the missing candidates (the probe's are
reused) and verifies them all. The thresholds are calibrated from eval results with
``sharpen eval calibrate`` (see the README).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from protocol.errors import InvalidRequest
from protocol.uncertainty import Uncertainty
from protocol.wire import ChatCompletionRequest
from strategies import sampling
from strategies.answers import majority
from strategies.base import AnyRequest, Candidate, Caps, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.best_of_n import DEFAULT_VERIFIERS, BestOfN, BestOfNOptions
from strategies.chat import rank_by_votes
from strategies.verifiers import VerifierNames


class AutoOptions(StrategyOptions):
    probe_n: int = Field(default=3, ge=1, le=16)
    agree_threshold: float = Field(default=1.0, ge=0, le=1.01)  # probe agreement needed to answer at once
    min_logprob: float | None = None  # and, if set, the majority's mean token logprob at least this
    n: int = Field(default=8, ge=2, le=256)  # candidates in all when escalating
    temperature: float = Field(default=0.7, gt=0, le=2)
    verifiers: VerifierNames = Field(default_factory=lambda: list(DEFAULT_VERIFIERS), min_length=1)



class Auto(Strategy[AutoOptions]):
    """Probe, then answer or escalate to best_of_n."""

    name = "auto"
    Options = AutoOptions

    def check(self, caps: Caps) -> None:
        super().check(caps)
        self._bon().check(caps)
        if self.options.probe_n > self.options.n:
            raise InvalidRequest("probe_n cannot exceed n.", param="strategy.probe_n")

    def max_choices(self) -> int:
        return self.options.probe_n  # a confident probe answers from its own samples

    def _bon(self) -> BestOfN:
        o = self.options
        return BestOfN(BestOfNOptions(n=o.n, temperature=o.temperature, verifiers=o.verifiers,
                                      max_upstream_tokens=o.max_upstream_tokens, deadline_s=o.deadline_s))

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        o = self.options
        notes: list[str] = []
        probe, cands = await sampling.sample(request, ctx, o.probe_n, o.temperature, notes)
        best, share = majority([c.answer for c in cands])
        lps = [c.logprob for c in cands if c.answer == best and c.logprob is not None]
        mean_lp = sum(lps) / len(lps) if lps else None
        confident = best is not None and share >= o.agree_threshold and (
            o.min_logprob is None or (mean_lp is not None and mean_lp >= o.min_logprob))
        probe_trace: dict[str, Any] = {"probe_n": o.probe_n, "probe_answer": best, "probe_agreement": share,
                                       "probe_mean_logprob": mean_lp, "escalated": not confident}
        if confident:
            ranked = rank_by_votes(cands)
            return StrategyResult(response=sampling.answer(probe, ranked, request), candidates=cands,
                                  uncertainty=Uncertainty(score=1.0 - share, agreement=share), notes=notes,
                                  extra_trace=probe_trace)
        upstream, merged = probe, cands
        if o.n > o.probe_n:  # probe_n == n: nothing to top up (an n=0 call would be refused)
            # the client's n was checked against the probe (admit), not against this top-up alone
            more, extra = await sampling.sample(request.model_copy(update={"n": None}), ctx, o.n - o.probe_n,
                                                o.temperature, notes)
            upstream, merged = _merge(probe, cands, more, extra)
        result = await self._bon().judge(request, ctx, upstream, merged, notes)
        result.extra_trace.update(probe_trace)
        return result


def _merge(a: dict[str, Any], ca: list[Candidate], b: dict[str, Any], cb: list[Candidate]
           ) -> tuple[dict[str, Any], list[Candidate]]:
    """One upstream-shaped answer holding both calls' choices, candidates reindexed to match."""
    choices_a = sorted(a["choices"], key=lambda c: int(c.get("index", 0)))
    choices_b = sorted(b["choices"], key=lambda c: int(c.get("index", 0)))
    merged = dict(a)
    merged["choices"] = [dict(c, index=i) for i, c in enumerate(choices_a + choices_b)]
    cands = list(ca)
    for c in cb:
        c.index += len(choices_a)
        cands.append(c)
    return merged, cands
