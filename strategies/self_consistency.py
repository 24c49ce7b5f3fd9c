"""Self-consistency (Wang et al., 2023): sample N, extract each final answer, majority vote.

Free-form answers that yield no extractable answer fall back to universal self-consistency
(Chen et al., 2023): the model itself picks the candidate most consistent with the others.
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import Field

from server.errors import InvalidRequest, SharpenError
from server.wire import ChatCompletionRequest
from strategies import sampling
from strategies.answers import extract, majority
from strategies.base import (
    AnyRequest,
    Candidate,
    Caps,
    Strategy,
    StrategyContext,
    StrategyOptions,
    StrategyResult,
    Uncertainty,
)


class SelfConsistencyOptions(StrategyOptions):
    n: int = Field(default=8, ge=1, le=256)
    temperature: float = Field(default=0.7, gt=0, le=2)
    usc: bool = True  # universal self-consistency when answers cannot be extracted


def form_key(c: Candidate) -> tuple[int, float]:
    """Best-formed first: finished normally, then most confident."""
    return (0 if c.finish_reason == "stop" else 1, -(c.logprob if c.logprob is not None else -1e9))


_PICK = re.compile(r"\d+")


class SelfConsistency(Strategy):
    """Majority vote over N candidates drawn in one ``n=N`` call."""

    name = "self_consistency"
    Options = SelfConsistencyOptions

    def check(self, caps: Caps) -> None:
        super().check(caps)
        opts: SelfConsistencyOptions = self.options  # type: ignore[assignment]
        if opts.n > caps.max_n:
            if "n" in opts.model_fields_set:
                raise InvalidRequest(f"n is capped at {caps.max_n} on this server.", param="strategy.n")
            opts.n = caps.max_n  # the default must not make a plain request fail on a capped server

    def admit(self, request: AnyRequest) -> None:
        if isinstance(request, ChatCompletionRequest):
            sampling.check_n(request, self.options.n)  # type: ignore[attr-defined]

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        opts: SelfConsistencyOptions = self.options  # type: ignore[assignment]
        notes: list[str] = []
        upstream, cands = await sampling.sample(request, ctx, opts.n, opts.temperature, notes)
        best, share = majority([c.answer for c in cands])
        # Counted without extract's last-line fallback, which "finds" an answer in any free-form
        # text: otherwise free-form candidates never reach universal self-consistency.
        parsed = sum(extract(c.content, last_line=False) is not None for c in cands)
        if opts.usc and len(cands) > 1 and (best is None or parsed < len(cands) / 2):
            ranked = await self._universal(request, ctx, cands, notes)
        else:
            votes = Counter(c.answer for c in cands if c.answer is not None)
            ranked = sorted(cands, key=lambda c: (-votes.get(c.answer, 0) if c.answer else 0, *form_key(c)))
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
        question = request.messages[-1].content if isinstance(request.messages[-1].content, str) else ""
        prompt = (f"Question:\n{question}\n\nI have generated the following responses to the question:\n\n"
                  f"{listing}\n\nEvaluate these responses. Select the most consistent response based on majority "
                  "consensus. Reply with only the number of that response.")
        body = {"model": ctx.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                "temperature": 0.0}
        notes.append("answers could not be extracted: universal self-consistency")
        try:
            data = await ctx.chat(body, purpose="usc")
            text = (data["choices"][0].get("message") or {}).get("content") or ""
            m = _PICK.search(text)
            pick = int(m.group()) - 1 if m else -1
        except (SharpenError, KeyError, IndexError, TypeError):
            pick = -1
        ordered = sorted(cands, key=form_key)
        if 0 <= pick < len(cands):
            chosen = cands[pick]
            return [chosen] + [c for c in ordered if c is not chosen]
        notes.append("the model's pick was unreadable; best-formed candidate chosen")
        return ordered
