"""Best-of-N with multiple verifiers (BoN-MAV; Lifshitz et al., 2025).

N candidates come from one ``n=N`` upstream call; every verifier scores every candidate, all
calls at once (the upstream batches them); a candidate's score is the weighted mean of the
verdicts it got (so a failed verifier call neither helps nor sinks it). Ties go to answer
agreement, then to the mean token logprob. If every LLM verifier call fails, the answer comes
from agreement alone and the trace says so.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import Field, field_validator

from protocol.errors import InvalidRequest
from protocol.uncertainty import Uncertainty
from protocol.wire import ChatCompletionRequest
from strategies import sampling, verifiers
from strategies.answers import majority
from strategies.base import AnyRequest, Candidate, Caps, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.chat import votes
from strategies.verifiers import Verdict, VerificationTask, Verifier, VerifierNames
from strategies.verifiers.regex import InvalidPattern, compile_pattern

DEFAULT_VERIFIERS = ["approval", "math_steps", "logic_steps", "rederive", "agreement"]


class BestOfNOptions(StrategyOptions):
    n: int = Field(default=8, ge=1, le=256)
    temperature: float = Field(default=0.7, gt=0, le=2)
    verifiers: VerifierNames = Field(default_factory=lambda: list(DEFAULT_VERIFIERS), min_length=1)
    weights: dict[str, float] = Field(default_factory=dict)  # verifier name -> weight (default 1)
    verifier_model: str | None = None  # another upstream model or adapter; the request's by default
    verifier_style: Literal["brief", "reasoned"] = "brief"
    verifier_regex: str | None = None
    soft: bool = True  # use the verdict token's probability where the upstream gives logprobs


    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [x for x in v if x not in verifiers.NAMES]
        if bad:
            raise ValueError(f"weights for unknown verifier(s) {bad}; valid: {', '.join(verifiers.NAMES)}")
        if any(not 0 <= w < float("inf") for w in v.values()):
            raise ValueError("weights must be finite and at least 0")
        return v


class BestOfN(Strategy[BestOfNOptions]):
    """Picks the candidate the verifiers approve most."""

    name = "best_of_n"
    Options = BestOfNOptions

    @classmethod
    def fit(cls, options: BestOfNOptions, caps: Caps) -> BestOfNOptions:
        if "n" in options.model_fields_set:
            return options
        n = min(options.n, caps.max_n)
        llm = sum(1 for v in options.verifiers if v in verifiers.ASPECTS)
        if llm and n * llm > caps.max_verifier_calls:
            n = max(1, caps.max_verifier_calls // llm)
        return options if n == options.n else options.model_copy(update={"n": n})

    def check(self, caps: Caps) -> None:
        super().check(caps)
        o = self.options
        if o.n > caps.max_n:
            raise InvalidRequest(f"n is capped at {caps.max_n} on this server.", param="strategy.n")
        llm = sum(1 for v in o.verifiers if v in verifiers.ASPECTS)
        calls = o.n * llm
        if calls > caps.max_verifier_calls:
            raise InvalidRequest(f"{o.n} candidates x {calls // max(o.n, 1)} LLM verifiers = {calls} verifier calls; "
                                 f"this server allows {caps.max_verifier_calls}.", param="strategy.verifiers")
        if "regex" in o.verifiers and not o.verifier_regex:
            raise InvalidRequest("the regex verifier needs 'verifier_regex'.", param="strategy.verifier_regex")
        if o.verifier_regex:
            try:
                compile_pattern(o.verifier_regex)
            except InvalidPattern as exc:
                raise InvalidRequest(f"'verifier_regex': {exc}.", param="strategy.verifier_regex") from None

    def max_choices(self) -> int:
        return self.options.n

    def _verifiers(self, request: ChatCompletionRequest, model: str | None) -> list[Verifier]:
        o = self.options
        names = list(o.verifiers)
        if request.response_format and request.response_format.get("type") in ("json_object", "json_schema") \
                and "json_schema" not in names:
            names.append("json_schema")
        return [verifiers.build(n, model=model, style=o.verifier_style, regex=o.verifier_regex, soft=o.soft)
                for n in names]

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        o = self.options
        notes: list[str] = []
        upstream, cands = await sampling.sample(request, ctx, o.n, o.temperature, notes)
        return await self.judge(request, ctx, upstream, cands, notes)

    async def judge(self, request: ChatCompletionRequest, ctx: StrategyContext, upstream: dict[str, Any],
                    cands: list[Candidate], notes: list[str]) -> StrategyResult:
        """Scores candidates already drawn (``upstream`` holds their choices) and ranks them."""
        o = self.options
        model = await ctx.resolve(o.verifier_model) if o.verifier_model else None
        vs = self._verifiers(request, model)
        task = VerificationTask(messages=[m.model_dump() for m in request.messages], candidates=cands,
                                response_format=request.response_format)
        results: list[list[Verdict]] = list(await asyncio.gather(*(v.score(task, ctx) for v in vs)))
        llm = [(v, r) for v, r in zip(vs, results, strict=True) if v.calls_per_candidate]
        all_failed = bool(llm) and all(d.error for _, r in llm for d in r)
        if all_failed:
            notes.append("every verifier call failed: answered from answer agreement alone")
        for c_i, cand in enumerate(cands):
            total = weight = 0.0
            for v, r in zip(vs, results, strict=True):
                d = r[c_i]
                cand.verdicts[v.name] = {"score": d.score, "approved": d.approved, "soft": d.soft,
                                         "detail": d.detail, "error": d.error}
                if d.score is None or (all_failed and v.calls_per_candidate):
                    continue
                w = o.weights.get(v.name.removeprefix("aspect:"), 1.0)
                total += w * d.score
                weight += w
            cand.scores["verifiers"] = total / weight if weight else 0.0
        counts = votes(cands)
        for c in cands:
            c.scores["agreement"] = counts.get(c.answer, 0) / len(cands) if c.answer else 0.0
        ranked = sorted(cands, key=lambda c: (-c.scores["verifiers"], -c.scores["agreement"],
                                              -(c.logprob if c.logprob is not None else -1e9)))
        return StrategyResult(
            response=sampling.answer(upstream, ranked, request),
            candidates=cands,
            uncertainty=self._uncertainty(ranked),
            notes=notes,
            extra_trace={"verifiers": [v.name for v in vs], "all_verifiers_failed": all_failed},
        )

    @staticmethod
    def _uncertainty(ranked: list[Candidate]) -> Uncertainty:
        """1 - mean(answer agreement, best approval); margins reported alongside."""
        _, share = majority([c.answer for c in ranked])
        best = ranked[0].scores["verifiers"]
        second = ranked[1].scores["verifiers"] if len(ranked) > 1 else 0.0
        lps = [c.logprob for c in ranked if c.logprob is not None]
        lp_margin = (ranked[0].logprob - max(lps[1:], default=ranked[0].logprob)
                     if ranked[0].logprob is not None and len(lps) > 1 else None)
        score = 1.0 - (share + best) / 2
        return Uncertainty(score=min(max(score, 0.0), 1.0), agreement=share, approval_margin=best - second,
                           logprob_margin=lp_margin)
