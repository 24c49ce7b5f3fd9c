"""``auto``: spend compute only where it pays.

The probe is ``pal`` program-aided candidates (one ``n=pal`` call, the programs run in the
sandbox): if every program that ran printed the same answer, that answer returns at once. Where
programs ran but disagree, ``pal_more`` further programs are drawn (one more call), and an answer
printed by at least two programs and by more than any other returns. Where programs do not apply
(tools or JSON, more choices asked for than ``pal``, or ``pal: 0``) the probe is ``probe_n`` prose
samples, which answer at once when they agree. An unsettled probe escalates to ``best_of_n``: the
missing candidates are drawn (in waves when ``stop_threshold`` is set), the probe's are reused,
and all ``n`` are judged together. Measured on the default model (README "Selection").
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from protocol.errors import InvalidRequest
from protocol.uncertainty import Uncertainty
from protocol.wire import ChatCompletionRequest
from strategies import pal, sampling, waves
from strategies.answers import majority
from strategies.base import AnyRequest, Caps, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.best_of_n import DEFAULT_VERIFIERS, BestOfN, BestOfNOptions
from strategies.chat import rank_by_votes
from strategies.verifiers import VerifierNames

# Defaults measured on the default model (loadtest/selection_bench.py, README "Selection").
WAVE = 8
PAL = 2  # the probe; escalated, pal + pal_more programs and the prose vote together as best_of_n's do
PAL_MORE = 2
N = 6  # tuned within 40% of best_of_n's tokens (README "Selection"); 8 cost 13% more tokens for 0.4 points
STOP_THRESHOLD: float | None = None


class AutoOptions(StrategyOptions):
    probe_n: int = Field(default=3, ge=1, le=16)
    agree_threshold: float = Field(default=1.0, ge=0, le=1.01)  # probe agreement needed to answer at once
    min_logprob: float | None = None  # and, if set, the majority's mean token logprob at least this
    n: int = Field(default=N, ge=2, le=256)  # candidates in all when escalating
    temperature: float = Field(default=0.7, gt=0, le=2)
    verifiers: VerifierNames = Field(default_factory=lambda: list(DEFAULT_VERIFIERS), min_length=1)
    pal: int = Field(default=PAL, ge=0, le=64)  # program-aided candidates (of n): the probe where they apply
    # more programs when the probe's disagree (never past n in all); 0: escalate to prose at once
    pal_more: int = Field(default=PAL_MORE, ge=0, le=64)
    wave: int = Field(default=WAVE, ge=1, le=256)  # candidates per call after the probe
    stop_threshold: float | None = Field(default=STOP_THRESHOLD, gt=0.5, le=1.0)  # None: draw all n



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
        return BestOfN(BestOfNOptions(n=o.n, temperature=o.temperature, verifiers=o.verifiers, pal=o.pal,
                                      max_upstream_tokens=o.max_upstream_tokens, deadline_s=o.deadline_s))

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        o = self.options
        k = o.pal if pal.applicable(request) else 0
        if k and (request.n or 1) <= k:
            return await self._programs_first(request, ctx, k)
        return await self._prose_first(request, ctx, k)

    async def _programs_first(self, request: ChatCompletionRequest, ctx: StrategyContext, k: int) -> StrategyResult:
        o = self.options
        notes: list[str] = []
        probe, progs = await pal.draw(request, ctx, k, o.temperature, start=0)
        printed = [c.answer for c in progs if c.answer is not None]
        answer = printed[0] if len(set(printed)) == 1 else None
        more = min(o.pal_more, o.n - k)
        if answer is None and printed and more > 0:
            # The programs ran but disagree: a second wave of programs (cheap beside prose on every
            # family measured) settles most of these; two abstentions say programs do not apply.
            extra, progs2 = await pal.draw(request, ctx, more, o.temperature, start=k)
            probe, progs = pal.merge(probe, extra), progs + progs2
            answer = pal.leader([c.answer for c in progs], min_votes=2)
        share = sum(c.answer == answer for c in progs) / len(progs) if answer is not None else 0.0
        probe_trace: dict[str, Any] = {"probe": "programs", "probe_n": len(progs), "probe_waves": 1 + (len(progs) > k),
                                       "probe_answer": answer, "probe_agreement": share, "escalated": answer is None}
        if answer is not None:
            ranked = sorted(progs, key=lambda c: (c.answer != answer, c.index))
            return StrategyResult(response=sampling.answer(probe, ranked, request), candidates=progs,
                                  sampled=True, uncertainty=Uncertainty(score=1.0 - share, agreement=share),
                                  notes=notes, extra_trace=probe_trace)
        k = len(progs)
        if o.n > k:
            drawn = await waves.draw(request, ctx, o.n - k, o.temperature, notes, wave=o.wave,
                                     threshold=o.stop_threshold)
            for c in progs:  # the programs' choices go after the prose ones (pal.merge reindexes them so)
                c.index += len(drawn.candidates)
            probe_trace.update(waves=drawn.waves, stopped_early=drawn.stopped_early)
            upstream, cands = pal.merge(drawn.upstream, probe), drawn.candidates + progs
        else:
            upstream, cands = probe, progs
        result = await self._bon().judge(request, ctx, upstream, cands, notes)
        result.extra_trace.update(probe_trace)
        return result

    async def _prose_first(self, request: ChatCompletionRequest, ctx: StrategyContext, k: int) -> StrategyResult:
        o = self.options
        notes: list[str] = []
        if k < o.pal and not pal.applicable(request):
            notes.append("no program-aided candidates: the request wants tool calls or JSON")
        probe, cands = await sampling.sample(request, ctx, o.probe_n, o.temperature, notes)
        best, share = majority([c.answer for c in cands])
        lps = [c.logprob for c in cands if c.answer == best and c.logprob is not None]
        mean_lp = sum(lps) / len(lps) if lps else None
        confident = best is not None and share >= o.agree_threshold and (
            o.min_logprob is None or (mean_lp is not None and mean_lp >= o.min_logprob))
        probe_trace: dict[str, Any] = {"probe": "prose", "probe_n": o.probe_n, "probe_answer": best,
                                       "probe_agreement": share, "probe_mean_logprob": mean_lp,
                                       "escalated": not confident}
        if confident:
            ranked = rank_by_votes(cands)
            return StrategyResult(response=sampling.answer(probe, ranked, request), candidates=cands,
                                  sampled=True, uncertainty=Uncertainty(score=1.0 - share, agreement=share),
                                  notes=notes, extra_trace=probe_trace)
        # The rest in waves (the probe is the first), stopping once the leading answer is settled;
        # the client's n was checked against the probe (admit), not against a top-up alone.
        drawn = await waves.draw(request, ctx, max(o.n - k, o.probe_n), o.temperature, notes, wave=o.wave,
                                 threshold=o.stop_threshold, first=(probe, cands))
        upstream, merged = drawn.upstream, drawn.candidates
        probe_trace.update(waves=drawn.waves, stopped_early=drawn.stopped_early)
        if k:  # best_of_n's program-aided candidates, beside the prose ones
            extra, programs = await pal.draw(request, ctx, k, o.temperature, start=len(merged))
            upstream, merged = pal.merge(upstream, extra), merged + programs
        result = await self._bon().judge(request, ctx, upstream, merged, notes)
        result.extra_trace.update(probe_trace)
        return result
