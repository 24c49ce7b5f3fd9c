"""Self-consistency (Wang et al., 2023): sample N, extract each final answer, majority vote.

Free-form answers that yield no extractable answer fall back to universal self-consistency
(Chen et al., 2023): the model itself picks the candidate most consistent with the others.
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import Field

from protocol.errors import InvalidRequest, SharpenError
from protocol.uncertainty import Uncertainty
from protocol.wire import ChatCompletionRequest
from strategies import sampling, tool_calls
from strategies.answers import extract, majority
from strategies.base import AnyRequest, Candidate, Caps, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.chat import first_text, form_key, question, rank_by_votes


class SelfConsistencyOptions(StrategyOptions):
    n: int = Field(default=8, ge=1, le=256)
    temperature: float = Field(default=0.7, gt=0, le=2)
    usc: bool = True  # universal self-consistency when answers cannot be extracted


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

    def max_choices(self) -> int:
        return self.options.n

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        opts = self.options
        notes: list[str] = []
        upstream, cands = await sampling.sample(request, ctx, opts.n, opts.temperature, notes)
        best, share = majority([c.answer for c in cands])
        # Counted without extract's last-line fallback, which "finds" an answer in any free-form
        # text: otherwise free-form candidates never reach universal self-consistency.
        parsed = sum(tool_calls.is_key(c.answer) or extract(c.content, last_line=False) is not None for c in cands)
        if opts.usc and len(cands) > 1 and (best is None or parsed < len(cands) / 2):
            ranked = await self._universal(request, ctx, cands, notes)
        else:
            ranked = rank_by_votes(cands)
            best = ranked[0].answer if ranked[0].answer is not None else best  # a tie goes where the answer went
        for c in cands:
            c.scores["votes"] = float(Counter(x.answer for x in cands)[c.answer]) if c.answer else 0.0
        return StrategyResult(
            response=sampling.answer(upstream, ranked, request),
            candidates=cands,
            uncertainty=Uncertainty(score=1.0 - share, agreement=share),
            notes=notes,
            extra_trace={"majority_answer": best, "answers_parsed": parsed},
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
