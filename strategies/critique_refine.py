"""Critique and refine: Self-Refine (Madaan et al., 2023), CRITIC (Gou et al., 2024) and STICK
from "TICKing All the Boxes" (Cook et al., 2024).

Answer, then loop: critique the answer (several aspects, optionally against a generated YES/NO
checklist of the instruction's requirements, optionally with the output of the Python the answer
contains, run in the sandbox), stop when the critique approves, else refine with the history of
answers and critiques. Also stops when the answer stops changing, or after ``max_rounds``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from protocol.uncertainty import Uncertainty
from protocol.wire import ChatCompletionRequest
from strategies import sampling, selection
from strategies.answers import normalize
from strategies.base import AnyRequest, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.chat import completion, first_text, question
from strategies.sandbox import SandboxLimits, SandboxUnavailable, extract_code, run_python
from strategies.verifiers.aspect import parse_verdict

_CHECK_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*(.+?)\s*$")
_CHECK_ANSWER = re.compile(r"^\s*(?:[-*•]|\d+[.)])?\s*(YES|NO)\b", re.IGNORECASE | re.MULTILINE)


class CritiqueRefineOptions(StrategyOptions):
    max_rounds: int = Field(default=3, ge=1, le=10)
    checklist: bool = False  # TICK: generate YES/NO requirements and critique against them
    tools: bool = False  # CRITIC: run the answer's Python in the sandbox and show the critic its output
    critic_model: str | None = None  # another upstream model or adapter; the request's by default
    critique_max_tokens: int = Field(default=384, ge=16, le=4096)
    tool_timeout_s: float = Field(default=5.0, gt=0, le=60)


class CritiqueRefine(Strategy[CritiqueRefineOptions]):
    """Answer -> critique -> refine, until approved, unchanged, or out of rounds."""

    name = "critique_refine"
    Options = CritiqueRefineOptions

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        o = self.options
        critic = await ctx.resolve(o.critic_model) if o.critic_model else ctx.model
        asked = question(request)
        base = {k: v for k, v in ctx.body.items() if k not in ("stream", "stream_options", "n")}
        # Token logprobs score each draft's confidence for the final choice among them.
        base.update(logprobs=True, top_logprobs=max(request.top_logprobs or 0, sampling.TOP_LOGPROBS))
        data = await ctx.chat(dict(base), purpose="answer")
        answer = first_text(data)
        checklist = await self._checklist(asked, critic, ctx) if o.checklist else []
        history: list[tuple[str, str]] = []
        rounds: list[dict[str, Any]] = []
        cands = sampling.candidates(data, request)[:1]
        approved_at: int | None = None
        stop = "max_rounds"
        for r in range(o.max_rounds):
            tool = await self._tool_feedback(answer, ctx) if o.tools else None
            critique, approved = await self._critique(asked, answer, checklist, tool, critic, ctx)
            rounds.append({"round": r, "answer": answer, "critique": critique, "approved": approved, "tool": tool})
            cands[-1].verdicts["critique"] = {"approved": approved, "critique": critique[-500:],
                                              "score": 1.0 if approved else 0.0}
            if approved:
                approved_at, stop = r, "approved"
                break
            if r == o.max_rounds - 1:
                break
            history.append((answer, critique))
            data = await ctx.chat(dict(base, messages=self._refine_messages(request, history)), purpose="refine")
            new = first_text(data)
            cands.append(sampling.candidates(data, request, start=len(cands))[0])
            if normalize(new) == normalize(answer):
                answer, stop = new, "unchanged"
                break
            answer = new
        # The vote over the drafts: a less sure refinement does not replace a better first draft.
        chosen = selection.best_draft(cands)
        answer = chosen.content
        response = completion(answer, like=data, model=ctx.model, finish_reason=chosen.finish_reason or "stop")
        # Approved at once: sure; approved after refining: less so; never approved: unsure.
        u = 0.0 if approved_at == 0 else (0.5 if approved_at is not None else 1.0)
        return StrategyResult(response=response, candidates=cands, uncertainty=Uncertainty(score=u),
                              extra_trace={"rounds": rounds, "checklist": checklist, "stopped": stop,
                                           "chosen_draft": chosen.index})

    async def _checklist(self, question: str, model: str, ctx: StrategyContext) -> list[str]:
        prompt = ("Write a checklist of the requirements a response to the instruction below must meet, as YES/NO "
                  "questions, one per line starting with '- '. At most 6 items, no other text.\n\n"
                  f"Instruction:\n{question}")
        data = await ctx.chat({"model": model, "messages": [{"role": "user", "content": prompt}],
                               "max_tokens": 256, "temperature": 0.0}, purpose="checklist")
        items = [m.group(1) for ln in first_text(data).splitlines() if (m := _CHECK_ITEM.match(ln))]
        return items[:6]

    async def _tool_feedback(self, answer: str, ctx: StrategyContext) -> str | None:
        code = extract_code(answer)
        if code is None:
            return None
        # The tool's time comes out of the request's deadline too.
        wall = min(self.options.tool_timeout_s, max(ctx.remaining(), 0.05))
        try:
            result = await run_python(code, SandboxLimits(wall_s=wall,
                                                          cpu_s=max(1, int(self.options.tool_timeout_s))))
        except SandboxUnavailable as e:  # the tool abstains: never run with less isolation
            return f"The code was not run: code execution is unavailable on this server ({e})."
        return result.summary()

    async def _critique(self, question: str, answer: str, checklist: list[str], tool: str | None, model: str,
                        ctx: StrategyContext) -> tuple[str, bool]:
        parts = [f"Question:\n{question}", f"Proposed answer:\n{answer}"]
        if tool:
            parts.append(f"Running the Python code in the answer gave:\n{tool}")
        task = ("Critique the proposed answer: check its correctness, reasoning, completeness and format. "
                "List every problem you find, briefly.")
        if checklist:
            items = "\n".join(f"- {c}" for c in checklist)
            task += f"\nThen answer each checklist item with YES or NO, one per line, in order:\n{items}"
        task += ("\nEnd with a line that is exactly 'FINAL VERIFICATION ANSWER: True' if the answer is correct and "
                 "needs no change, or 'FINAL VERIFICATION ANSWER: False' otherwise.")
        parts.append(task)
        data = await ctx.chat({"model": model, "messages": [{"role": "user", "content": "\n\n".join(parts)}],
                               "max_tokens": self.options.critique_max_tokens, "temperature": 0.0}, purpose="critique")
        text = first_text(data)
        approved = parse_verdict(text) is True
        if checklist:
            marks = [m.upper() for m in _CHECK_ANSWER.findall(text)]
            # Every item must pass; a missing mark counts as a failure.
            approved = approved and len(marks) >= len(checklist) and all(m == "YES" for m in marks[-len(checklist):])
        return text, approved

    @staticmethod
    def _refine_messages(request: ChatCompletionRequest, history: list[tuple[str, str]]) -> list[dict[str, Any]]:
        msgs = [m.model_dump(exclude_none=True) for m in request.messages]
        for i, (ans, crit) in enumerate(history):
            msgs.append({"role": "assistant", "content": ans})
            last = i == len(history) - 1
            msgs.append({"role": "user", "content": f"Feedback on your answer:\n{crit}\n\n" + (
                "Write an improved, complete answer to the original request that fixes these problems. "
                "Give only the answer." if last else "Try again.")})
        return msgs

