"""Aspect verifiers (BoN-MAV): an upstream model checks one aspect of a candidate and ends with
a binary verdict. Where the upstream returns logprobs, the verdict token's probability is the
soft score; an unparseable verdict counts as a rejection.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any, Literal

from protocol.errors import SharpenError
from strategies.base import Candidate, StrategyContext
from strategies.verifiers.base import Verdict, VerificationTask, Verifier

# The aspects of "Multi-Agent Verification" (Lifshitz et al., 2025), one instruction each.
ASPECTS: dict[str, str] = {
    "approval": "Is the proposed answer correct and does it fully answer the question?",
    "math_steps": "Check every arithmetic and algebraic step of the proposed answer. Are all calculations correct?",
    "logic_steps": "Check the reasoning of the proposed answer step by step. Does each step follow from the "
    "previous ones, with no gaps or contradictions?",
    "facts": "Check the factual claims in the proposed answer. Are they all true?",
    "units": "Check quantities and units in the proposed answer. Are units consistent and is the final "
    "answer expressed in what the question asks for?",
    "edge_cases": "Does the proposed answer handle the edge cases and special conditions stated in the question?",
    "common_mistakes": "Does the proposed answer avoid the common mistakes people make on this kind of question "
    "(misreading it, off-by-one errors, sign errors, wrong order of operations)?",
    "domain_knowledge": "Using expert knowledge of the question's domain, is the proposed answer sound?",
    "rederive": "Solve the question yourself another way, then compare. Does your result match the proposed "
    "final answer?",
}

_SYSTEM = "You are a careful, strict verifier. You check one aspect of a proposed answer to a question."
_STYLE = {
    "brief": "Do not explain. Reply with exactly one line: 'FINAL VERIFICATION ANSWER: True' if it passes this "
    "check, or 'FINAL VERIFICATION ANSWER: False' if it does not.",
    "reasoned": "Think it through in a few short sentences, then end with a line that is exactly "
    "'FINAL VERIFICATION ANSWER: True' if it passes this check, or 'FINAL VERIFICATION ANSWER: False' if not.",
}
_VERDICT = re.compile(r"FINAL\s+VERIFICATION\s+ANSWER\W*(true|false|yes|no|correct|incorrect)\b", re.IGNORECASE)
_BARE = re.compile(r"^\W*(true|false|yes|no|correct|incorrect)\W*$", re.IGNORECASE)
_TRUE = frozenset({"true", "yes", "correct"})
_FALSE = frozenset({"false", "no", "incorrect"})


def parse_verdict(text: str | None) -> bool | None:
    """True/False from a verifier's output; None when no verdict can be read."""
    if not text:
        return None
    found = _VERDICT.findall(text)
    if found:
        return found[-1].lower() in _TRUE
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        m = _BARE.match(lines[-1])
        if m:
            return m.group(1).lower() in _TRUE
    return None


def _word(token: Any) -> str:
    return str(token or "").strip().strip("*`'\":.").lower()


def _verdict_token(content: list[Any]) -> int | None:
    """The index of the token that holds the last "FINAL VERIFICATION ANSWER: <verdict>" word."""
    tokens = [str(e.get("token", "")) if isinstance(e, dict) else "" for e in content]
    found = list(_VERDICT.finditer("".join(tokens)))
    if not found:
        return None
    at, end = found[-1].start(1), 0
    for i, tok in enumerate(tokens):
        end += len(tok)
        if end > at:
            return i
    return None


def verdict_probability(logprobs: dict[str, Any] | None) -> float | None:
    """P(approve) from the verdict token's top logprobs (chat logprobs shape), if present.

    The verdict token is the word after the last "FINAL VERIFICATION ANSWER"; without that
    marker, the last true/false-like token (a yes/no in trailing text must not count)."""
    content = (logprobs or {}).get("content") or []
    at = _verdict_token(content)
    for entry in (content[at:] if at is not None else reversed(content)):
        if not isinstance(entry, dict):
            continue
        tok = _word(entry.get("token"))
        if tok in _TRUE or tok in _FALSE:
            p_true = p_false = 0.0
            for alt in entry.get("top_logprobs") or [entry]:
                t = _word(alt.get("token"))
                lp = alt.get("logprob")
                if lp is None:
                    continue
                if t in _TRUE:
                    p_true += math.exp(lp)
                elif t in _FALSE:
                    p_false += math.exp(lp)
            if p_true + p_false > 0:
                return p_true / (p_true + p_false)
            return None
    return None


class AspectVerifier(Verifier):
    """One MAV aspect, asked of ``model`` (the request's model when None) for each candidate."""

    calls_per_candidate = 1

    def __init__(self, aspect: str, *, model: str | None = None, style: Literal["brief", "reasoned"] = "brief",
                 max_tokens: int | None = None, soft: bool = True) -> None:
        if aspect not in ASPECTS:
            raise ValueError(f"unknown aspect {aspect!r}")
        self.aspect = aspect
        self.name = f"aspect:{aspect}"  # type: ignore[misc]
        self.model = model
        self.style = style
        self.max_tokens = max_tokens or (16 if style == "brief" else 320)
        self.soft = soft

    def prompt(self, question: str, candidate: Candidate) -> list[dict[str, str]]:
        # The aspect comes last so the question+candidate prefix is shared (vLLM prefix cache)
        # by every aspect checking the same candidate.
        user = (f"Question:\n{question}\n\nProposed answer:\n{candidate.content}\n\n"
                f"Verification task: {ASPECTS[self.aspect]}\n{_STYLE[self.style]}")
        return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]

    async def _one(self, question: str, candidate: Candidate, ctx: StrategyContext) -> Verdict:
        body: dict[str, Any] = {
            "model": self.model or ctx.model,
            "messages": self.prompt(question, candidate),
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        if self.soft:
            body.update(logprobs=True, top_logprobs=5)
        try:
            data = await ctx.chat(body, purpose=f"verify:{self.aspect}")
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content")
        except (SharpenError, KeyError, IndexError, TypeError) as exc:
            msg = exc.message if isinstance(exc, SharpenError) else f"malformed answer: {exc!r}"
            return Verdict(None, error=msg[:200])
        verdict = parse_verdict(text)
        if verdict is None:
            return Verdict(0.0, approved=False, detail="unparseable verdict: " + (text or "")[-120:])
        p = verdict_probability(choice.get("logprobs")) if self.soft else None
        if p is not None:
            return Verdict(p, approved=verdict, soft=True)
        return Verdict(1.0 if verdict else 0.0, approved=verdict)

    async def score(self, task: VerificationTask, ctx: StrategyContext) -> list[Verdict]:
        question = task.question
        return list(await asyncio.gather(*(self._one(question, c, ctx) for c in task.candidates)))
