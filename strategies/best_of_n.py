"""Best-of-N with multiple verifiers (BoN-MAV; Lifshitz et al., 2025).

N candidates come from one ``n=N`` upstream call (``pal`` of them program-aided); every verifier
scores every candidate, all calls at once (the upstream batches them); a candidate's quality is
the weighted mean of the verdicts it got (so a failed verifier call neither helps nor sinks it).
The answer is chosen by a vote over answer groups, each candidate weighing softmax(quality /
``vote_temperature``) (``strategies.selection``); the best candidate of the winning answer is
returned. If every LLM verifier call fails, the remaining verifiers decide and the trace says so.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import Field, field_validator

from protocol.errors import InvalidRequest
from protocol.uncertainty import Uncertainty
from protocol.wire import ChatCompletionRequest
from strategies import pal, sampling, selection, verifiers
from strategies.answers import FORM_NO_ANSWER, extract
from strategies.base import AnyRequest, Candidate, Caps, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.chat import votes
from strategies.selection import WeightedVote
from strategies.verifiers import Verdict, VerificationTask, Verifier, VerifierNames
from strategies.verifiers.regex import InvalidPattern, compile_pattern

# Defaults measured on the default model (loadtest/selection_bench.py, README "Selection"): 4 of
# the 8 candidates program-aided (on 251 TUNING items 1, 2, 3, 4 programs gave 60.6, 63.3, 63.7,
# 65.3%, each fewer tokens than the last), their executed answers raising the prose answers they
# agree with (weight 0.5 beside the token confidence's 1), a CISC vote at temperature 0.05. A 0.5B
# model judging itself adds noise (AUROC 0.51-0.63), so its LLM aspect verifiers join only when
# ``verifier_model`` names another (stronger) model, or when a request or calibrated config lists them.
DEFAULT_VERIFIERS = ["confidence"]
STRONG_VERIFIERS = ["confidence", "approval", "math_steps", "logic_steps", "rederive"]
DEFAULT_WEIGHTS = {"execution": 0.5}
VOTE_TEMPERATURE: float | None = 0.05
PAL = 4
# Stop waiting for programs still running at 2x the prose call's time once a finished one printed
# an answer: online (2026-12-06, 20 family_relationships + 20 spell_backward items, one request at a
# time) the mean wall time fell 10.1 -> 5.6 s and 13.5 -> 9.7 s, completion tokens by 28-31%,
# accuracy +3/-2; re-scored offline on 503 stored items: 330 -> 328 right, all on spell_backward.
PROGRAM_DEADLINE = 2.0


class BestOfNOptions(StrategyOptions):
    n: int = Field(default=8, ge=1, le=256)
    temperature: float = Field(default=0.7, gt=0, le=2)
    verifiers: VerifierNames | None = Field(default=None, min_length=1)  # None: the defaults above
    weights: dict[str, float] = Field(default_factory=dict)  # verifier name -> weight (default 1)
    # The answer-group vote: CISC softmax over candidate quality at this temperature (None: one
    # vote each); ``keep`` < 1 drops the least confident share first (DeepConf).
    vote_temperature: float | None = Field(default=VOTE_TEMPERATURE, gt=0, le=100)
    keep: float = Field(default=1.0, gt=0, le=1)
    pal: int = Field(default=PAL, ge=0, le=64)  # program-aided candidates (of n); adds the execution verifier
    # Stop waiting for programs still running at this multiple of the prose call's time, once a
    # finished one has printed an answer (the program call streamed; None: wait for all of them).
    program_deadline: float | None = Field(default=PROGRAM_DEADLINE, gt=1, le=100)
    verifier_model: str | None = None  # another upstream model or adapter; the request's by default
    verifier_style: Literal["brief", "reasoned"] = "brief"
    verifier_regex: str | None = None
    soft: bool = True  # use the verdict token's probability where the upstream gives logprobs

    def chosen_verifiers(self) -> list[str]:
        """The verifiers asked for, or the defaults (LLM aspects only with another verifier model)."""
        names = list(self.verifiers) if self.verifiers is not None else list(
            STRONG_VERIFIERS if self.verifier_model else DEFAULT_VERIFIERS)
        if self.pal and "execution" not in names:
            names.append("execution")
        return names

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
        n = options.n
        if "n" not in options.model_fields_set:
            n = min(options.n, caps.max_n)
            llm = sum(1 for v in options.chosen_verifiers() if v in verifiers.ASPECTS)
            if llm and n * llm > caps.max_verifier_calls:
                n = max(1, caps.max_verifier_calls // llm)
        # Programs are part of the default policy (n=8, 2 programs, measured). A client that asks
        # for n candidates gets n samples of its own prompt in one call unless it asks for pal;
        # the default share follows n down when the cap lowers it. A pal the client chose is checked.
        if "pal" in options.model_fields_set:
            k = options.pal
        else:
            k = 0 if "n" in options.model_fields_set else min(options.pal, n // 2)
        return options if (n, k) == (options.n, options.pal) else options.model_copy(update={"n": n, "pal": k})

    def check(self, caps: Caps) -> None:
        super().check(caps)
        o = self.options
        if o.n > caps.max_n:
            raise InvalidRequest(f"n is capped at {caps.max_n} on this server.", param="strategy.n")
        llm = sum(1 for v in o.chosen_verifiers() if v in verifiers.ASPECTS)
        calls = o.n * llm
        if calls > caps.max_verifier_calls:
            raise InvalidRequest(f"{o.n} candidates x {calls // max(o.n, 1)} LLM verifiers = {calls} verifier calls; "
                                 f"this server allows {caps.max_verifier_calls}.", param="strategy.verifiers")
        if o.pal > o.n:
            raise InvalidRequest(f"pal ({o.pal}) cannot exceed n ({o.n}): program-aided candidates are part of "
                                 "the n.", param="strategy.pal")
        if "regex" in o.chosen_verifiers() and not o.verifier_regex:
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
        names = o.chosen_verifiers()
        if request.response_format and request.response_format.get("type") in ("json_object", "json_schema") \
                and "json_schema" not in names:
            names.append("json_schema")
        return [verifiers.build(n, model=model, style=o.verifier_style, regex=o.verifier_regex, soft=o.soft)
                for n in names]

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        o = self.options
        notes: list[str] = []
        k = o.pal if pal.applicable(request) else 0
        if k < o.pal:
            notes.append("no program-aided candidates: the request wants tool calls or JSON")
        upstream, cands = await pal.with_prose(request, ctx, o.n, k, o.temperature, notes, wait=o.program_deadline)
        return await self.judge(request, ctx, upstream, cands, notes)

    async def judge(self, request: ChatCompletionRequest, ctx: StrategyContext, upstream: dict[str, Any],
                    cands: list[Candidate], notes: list[str]) -> StrategyResult:
        """Scores candidates already drawn (``upstream`` holds their choices) and ranks them."""
        o = self.options
        model = await ctx.resolve(o.verifier_model) if o.verifier_model else None
        vs = self._verifiers(request, model)
        prose = [c for c in cands if not c.program]
        stated = sum(extract(c.content, last_line=False) is not None for c in prose)
        if any(c.program for c in cands) and prose and stated < len(prose) / 2:
            # Most prose replies state no final answer (free-form text): a program's printout is
            # no answer to that, so the programs abstain.
            notes.append("most candidates state no final answer: program-aided candidates abstain")
            for c in cands:
                if c.program:
                    c.answer, c.form = None, FORM_NO_ANSWER
        executed = [c.answer for c in cands if c.program and c.answer is not None]
        # LLM verifiers judge the prose candidates (a program's reply is code); the programmatic
        # ones every candidate, executed answers reaching the execution verifier as an option.
        msgs = [m.model_dump() for m in request.messages]
        whole = VerificationTask(messages=msgs, candidates=cands, response_format=request.response_format,
                                 options={"executed": executed})
        part = VerificationTask(messages=msgs, candidates=prose, response_format=request.response_format)
        results: list[list[Verdict]] = list(await asyncio.gather(
            *(v.score(part if v.calls_per_candidate else whole, ctx) for v in vs)))
        llm = [(v, r) for v, r in zip(vs, results, strict=True) if v.calls_per_candidate]
        all_failed = bool(llm) and all(d.error for _, r in llm for d in r)
        if all_failed:
            notes.append("every verifier call failed: answered from the remaining verifiers")
        where = {id(c): i for i, c in enumerate(prose)}
        for c_i, cand in enumerate(cands):
            for v, r in zip(vs, results, strict=True):
                i = where.get(id(cand)) if v.calls_per_candidate else c_i
                if i is None:
                    continue
                d = r[i]
                ok = not (all_failed and v.calls_per_candidate)
                cand.verdicts[v.name] = {"score": d.score if ok else None, "approved": d.approved, "soft": d.soft,
                                         "detail": d.detail, "error": d.error}
        names = [v.name.removeprefix("aspect:") for v in vs]
        weights = {n: o.weights.get(n, DEFAULT_WEIGHTS.get(n, 1.0)) for n in names}
        policy = WeightedVote(weights=weights, temperature=o.vote_temperature, keep=o.keep)
        ranked, choice = selection.rank(cands, policy)
        counts = votes(cands)
        for c in cands:
            c.scores["verifiers"] = c.scores.get("quality", 0.0)
            c.scores["agreement"] = counts.get(c.answer, 0) / len(cands) if c.answer is not None else 0.0
        share = counts.get(choice.answer, 0) / len(cands) if choice.answer is not None else 0.0
        return StrategyResult(
            response=sampling.answer(upstream, ranked, request),
            candidates=cands,
            sampled=True,
            uncertainty=self._uncertainty(ranked, share),
            notes=notes,
            extra_trace={"verifiers": [v.name for v in vs], "all_verifiers_failed": all_failed,
                         "weights": weights, "vote_temperature": o.vote_temperature, "answer": choice.answer},
        )

    @staticmethod
    def _uncertainty(ranked: list[Candidate], share: float) -> Uncertainty:
        """1 - mean(the winning answer's count share, best quality); margins reported alongside."""
        best = ranked[0].scores["verifiers"]
        second = ranked[1].scores["verifiers"] if len(ranked) > 1 else 0.0
        lps = [c.logprob for c in ranked if c.logprob is not None]
        lp_margin = (ranked[0].logprob - max(lps[1:], default=ranked[0].logprob)
                     if ranked[0].logprob is not None and len(lps) > 1 else None)
        score = 1.0 - (share + best) / 2
        return Uncertainty(score=min(max(score, 0.0), 1.0), agreement=share, approval_margin=best - second,
                           logprob_margin=lp_margin)
