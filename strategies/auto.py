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
from strategies import pal, sampling, waves
from strategies.answers import majority
from strategies.base import AnyRequest, Caps, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.best_of_n import DEFAULT_VERIFIERS, PAL, BestOfN, BestOfNOptions
from strategies.chat import rank_by_votes
from strategies.verifiers import VerifierNames

# Defaults measured on the default model (loadtest/selection_bench.py, README "Selection").
WAVE = 8
STOP_THRESHOLD: float | None = None


class AutoOptions(StrategyOptions):
    probe_n: int = Field(default=3, ge=1, le=16)
    agree_threshold: float = Field(default=1.0, ge=0, le=1.01)  # probe agreement needed to answer at once
    min_logprob: float | None = None  # and, if set, the majority's mean token logprob at least this
    n: int = Field(default=8, ge=2, le=256)  # candidates in all when escalating
    temperature: float = Field(default=0.7, gt=0, le=2)
    verifiers: VerifierNames = Field(default_factory=lambda: list(DEFAULT_VERIFIERS), min_length=1)
    pal: int = Field(default=PAL, ge=0, le=64)  # program-aided candidates added when escalating
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
        return BestOfN(BestOfNOptions(n=o.n + o.pal, temperature=o.temperature, verifiers=o.verifiers, pal=o.pal,
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
        # The rest in waves (the probe is the first), stopping once the leading answer is settled;
        # the client's n was checked against the probe (admit), not against a top-up alone.
        drawn = await waves.draw(request, ctx, o.n, o.temperature, notes, wave=o.wave, threshold=o.stop_threshold,
                                 first=(probe, cands))
        upstream, merged = drawn.upstream, drawn.candidates
        probe_trace.update(waves=drawn.waves, stopped_early=drawn.stopped_early)
        if o.pal and pal.applicable(request):  # best_of_n's program-aided candidates, beside the prose ones
            extra, programs = await pal.draw(request, ctx, o.pal, o.temperature, start=len(merged))
            upstream, merged = pal.merge(upstream, extra), merged + programs
        result = await self._bon().judge(request, ctx, upstream, merged, notes)
        result.extra_trace.update(probe_trace)
        return result

