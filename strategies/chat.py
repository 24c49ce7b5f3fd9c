"""Reading and building chat completions, for every strategy: the question of a request, the
first choice's text, ranking candidates by their votes, and a completion built from the wire
models (never a hand-written dict)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from protocol.wire import AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Usage, text_of
from strategies.base import Candidate


def question(request: ChatCompletionRequest) -> str:
    """The text of the last user message (content parts joined as text); "" when there is none."""
    for m in reversed(request.messages):
        if m.role == "user":
            return text_of(m.content)
    return ""


def first_text(data: dict[str, Any]) -> str:
    """The first choice's message text of a chat.completion object; "" when it has none."""
    try:
        return str((data["choices"][0].get("message") or {}).get("content") or "")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""


def first_finish(data: dict[str, Any]) -> str:
    """The first choice's finish reason ("stop" when the answer does not say)."""
    try:
        return str(data["choices"][0].get("finish_reason") or "stop")
    except (KeyError, IndexError, TypeError, AttributeError):
        return "stop"


def form_key(c: Candidate) -> tuple[int, float]:
    """Best-formed first: finished normally, then most confident."""
    return (0 if c.finish_reason in ("stop", "tool_calls") else 1, -(c.logprob if c.logprob is not None else -1e9))


def votes(cands: list[Candidate]) -> Counter[str]:
    """How many candidates gave each extracted answer."""
    return Counter(c.answer for c in cands if c.answer is not None)


def rank_by_votes(cands: list[Candidate]) -> list[Candidate]:
    """Candidates whose answer most others share first; ties (and no answer) by form."""
    v = votes(cands)
    return sorted(cands, key=lambda c: (-v.get(c.answer, 0) if c.answer else 0, *form_key(c)))


def completion(content: str, *, like: dict[str, Any], model: str, finish_reason: str = "stop") -> dict[str, Any]:
    """A one-choice chat.completion holding ``content``, with the id, creation time and model of
    ``like`` (the last upstream answer) where it has them. Usage is filled in by the server."""
    built = ChatCompletion(
        id=str(like.get("id") or f"chatcmpl-sharpen-{int(time.time() * 1000)}"),
        created=int(like.get("created") or time.time()),
        model=str(like.get("model") or model),
        choices=[ChatChoice(index=0, message=AssistantMessage(content=content), finish_reason=finish_reason)],
        usage=Usage(),
    )
    return built.model_dump(exclude={"usage", "sharpen"})
