"""Self-consistency (Wang et al., 2023): sample N, extract each final answer, majority vote.

Free-form answers that yield no extractable answer fall back to universal self-consistency
(Chen et al., 2023): the model itself picks the candidate most consistent with the others.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

from pydantic import Field

from protocol.errors import InvalidRequest, SharpenError
from protocol.uncertainty import Uncertainty
from protocol.wire import ChatCompletionRequest
from strategies import pal, sampling, selection, tool_calls, waves
from strategies.answers import extract, majority
from strategies.base import AnyRequest, Candidate, Caps, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.chat import first_text, form_key, question
from strategies.selection import WeightedVote

# Defaults measured on the default model (loadtest/selection_bench.py, README "Selection").
WAVE = 8
STOP_THRESHOLD: float | None = None
VOTE: Literal["majority", "confidence"] = "majority"
VOTE_TEMPERATURE = 0.1
# The measured early-stopping recipe (README "Selection"): 4 of the 8 candidates program-aided,
# drawn first in waves of 2, stopping at P(leader) >= 0.6. On the REPORT set it matched n=8 with
# the same candidates at 0.59x their tokens (prose-only early stopping did not: -5 points at
# 0.56x), but on GSM8K word problems held out it lost 10.7 points at 0.75x: short answers only.
EARLY_STOPPING = {"n": 8, "pal": 4, "wave": 2, "stop_threshold": 0.6}


class SelfConsistencyOptions(StrategyOptions):
    n: int = Field(default=8, ge=1, le=256)  # candidates at most
    temperature: float = Field(default=0.7, gt=0, le=2)
    usc: bool = True  # universal self-consistency when answers cannot be extracted
    # Early stopping (Adaptive-Consistency): draw ``wave`` at a time, stop once P(leader wins)
    # reaches ``stop_threshold`` (None: draw all n in one call).
    wave: int = Field(default=WAVE, ge=1, le=256)
    stop_threshold: float | None = Field(default=STOP_THRESHOLD, gt=0.5, le=1.0)
    # ...or once ``split_stop`` candidates are in and no two answers agree (None: never); the
    # most confident by ``signal`` then answers. Off by default: it halves the tokens but costs
    # ~5 points against n=8, significantly on word problems (README, "Selection").
    split_stop: int | None = Field(default=None, ge=2, le=256)
    # the token-confidence signal that weighs votes ("confidence") and breaks ties
    signal: Literal["mean_logprob", "mean_conf", "lowest_group", "tail", "self_certainty"] = "mean_logprob"
    # "majority": one vote each; "confidence": CISC, votes weighted by softmax(confidence / T)
    vote: Literal["majority", "confidence"] = VOTE
    vote_temperature: float = Field(default=VOTE_TEMPERATURE, gt=0, le=100)
    pal: int = Field(default=0, ge=0, le=64)  # program-aided candidates (of n) voting with the prose ones


_PICK = re.compile(r"\d+")


class SelfConsistency(Strategy[SelfConsistencyOptions]):
    """Majority vote over N candidates drawn in one ``n=N`` call."""

    name = "self_consistency"
    Options = SelfConsistencyOptions

    @classmethod
    def fit(cls, options: SelfConsistencyOptions, caps: Caps) -> SelfConsistencyOptions:
        if options.n > caps.max_n and "n" not in options.model_fields_set:
            return options.model_copy(update={"n": caps.max_n})
        return options

    def check(self, caps: Caps) -> None:
        super().check(caps)
        if self.options.n > caps.max_n:
            raise InvalidRequest(f"n is capped at {caps.max_n} on this server.", param="strategy.n")
        if self.options.pal > self.options.n:
            raise InvalidRequest(f"pal ({self.options.pal}) cannot exceed n ({self.options.n}): program-aided "
                                 "candidates are part of the n.", param="strategy.pal")

    def max_choices(self) -> int:
        return self.options.n

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        opts = self.options
        notes: list[str] = []
        stopping = opts.stop_threshold is not None or opts.split_stop is not None
        if opts.pal and not stopping:  # the prose call and the program call at once
            drawn = waves.Drawn(*await pal.with_prose(request, ctx, opts.n, opts.pal, opts.temperature, notes))
        else:
            # Stopping early with programs: they are the first waves, and prose follows only while
            # the leader is unsettled. Executed answers agree far more often than a weak model's
            # prose ones, so the rule stops sooner (README "Selection").
            drawn = await waves.draw(request, ctx, opts.n, opts.temperature, notes, wave=opts.wave,
                                     threshold=opts.stop_threshold, split=opts.split_stop, programs=opts.pal)
        upstream, cands = drawn.upstream, drawn.candidates
        best, share = majority([c.answer for c in cands])
        # Counted without extract's last-line fallback, which "finds" an answer in any free-form
        # text: otherwise free-form candidates never reach universal self-consistency.
        # A program that printed nothing abstains: it is not a free-form reply to judge.
        voters = [c for c in cands if not (c.program and c.answer is None)] or cands
        parsed = sum(tool_calls.is_key(c.answer) or extract(c.content, last_line=False) is not None for c in voters)
        if opts.usc and len(voters) > 1 and (best is None or parsed < len(voters) / 2):
            ranked = await self._universal(request, ctx, voters, notes)
            ranked += [c for c in cands if all(c is not r for r in ranked)]
        else:
            policy = WeightedVote(temperature=opts.vote_temperature if opts.vote == "confidence" else None)
            ranked, choice = selection.rank(cands, policy, opts.signal)
            best = choice.answer
            share = sum(c.answer == best for c in cands) / len(cands) if best is not None else 0.0
        for c in cands:
            c.scores["votes"] = float(Counter(x.answer for x in cands)[c.answer]) if c.answer else 0.0
        return StrategyResult(
            response=sampling.answer(upstream, ranked, request),
            candidates=cands,
            sampled=True,
            uncertainty=Uncertainty(score=1.0 - share, agreement=share),
            notes=notes,
            extra_trace={"majority_answer": best, "answers_parsed": parsed, "waves": drawn.waves,
                         "stopped_early": drawn.stopped_early, "split": drawn.split},
        )

    async def _universal(self, request: ChatCompletionRequest, ctx: StrategyContext, cands: list[Candidate],
                         notes: list[str]) -> list[Candidate]:
        """Asks the model which candidate agrees most with the rest; falls back to form order."""
        listing = "\n\n".join(f"Response {i + 1}:\n{c.content}" for i, c in enumerate(cands))
        prompt = (f"Question:\n{question(request)}\n\nI have generated the following responses to the question:\n\n"
                  f"{listing}\n\nEvaluate these responses. Select the most consistent response based on majority "
                  "consensus. Reply with only the number of that response.")
        body = {"model": ctx.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                "temperature": 0.0}
        notes.append("answers could not be extracted: universal self-consistency")
        try:
            data = await ctx.chat(body, purpose="usc")
            m = _PICK.search(first_text(data))
            pick = int(m.group()) - 1 if m else -1
        except (SharpenError, KeyError, IndexError, TypeError):
            pick = -1
        ordered = sorted(cands, key=form_key)
        if 0 <= pick < len(cands):
            chosen = cands[pick]
            return [chosen] + [c for c in ordered if c is not chosen]
        notes.append("the model's pick was unreadable; best-formed candidate chosen")
        return ordered
