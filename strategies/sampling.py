"""Drawing N candidates in one upstream call, and building the answer from the ranked ones."""

from __future__ import annotations

from typing import Any

from protocol.errors import UpstreamError
from protocol.wire import ChatCompletionRequest
from strategies import tool_calls
from strategies.answers import FORM_OK, final_answer, placeholders
from strategies.base import Candidate, StrategyContext
from strategies.chat import question
from strategies.confidence import from_openai, measure

TOP_LOGPROBS = 5  # alternatives per token for DeepConf's token confidence (the upstream allows <= 20)


def mean_logprob(choice: dict[str, Any]) -> float | None:
    content = (choice.get("logprobs") or {}).get("content") or []
    lps = [float(e["logprob"]) for e in content if isinstance(e, dict) and e.get("logprob") is not None]
    return sum(lps) / len(lps) if lps else None


async def sample(request: ChatCompletionRequest, ctx: StrategyContext, n: int, temperature: float,
                 notes: list[str], *, purpose: str = "candidates") -> tuple[dict[str, Any], list[Candidate]]:
    """N candidates from ONE upstream call with ``n=N`` (vLLM shares the prompt's KV cache).

    The client's sampling parameters are kept; a temperature of 0 (or none) would make every
    candidate the same, so it is replaced by ``temperature`` and the trace says so.
    """
    body = {k: v for k, v in ctx.body.items() if k not in ("stream", "stream_options")}
    body["n"] = n
    if not request.temperature:
        body["temperature"] = temperature
        notes.append(f"client temperature {request.temperature!r} replaced by {temperature} to sample {n} candidates")
    # Token logprobs with the top-k alternatives score every candidate's confidence at no extra
    # call (strategies.confidence); what the client did not ask for is stripped from the answer.
    body["logprobs"] = True
    body["top_logprobs"] = max(request.top_logprobs or 0, TOP_LOGPROBS)
    data = await ctx.chat(body, purpose=purpose)
    return data, candidates(data, request)


def candidates(data: dict[str, Any], request: ChatCompletionRequest, *, start: int = 0) -> list[Candidate]:
    """The choices of an upstream answer as candidates (indices from ``start``): answer and
    well-formedness (a placeholder copied from the prompt is no answer), confidence signals."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UpstreamError("the upstream returned no candidates")
    templates = placeholders(question(request))
    out = []
    for i, ch in enumerate(sorted(choices, key=lambda c: int(c.get("index", 0)))):
        message = ch.get("message") or {}
        content = message.get("content") or ""
        finish = ch.get("finish_reason")
        # A candidate that calls tools votes with its calls (same functions, equivalent arguments);
        # verifiers read the calls as text after whatever it said.
        calls = tool_calls.key(message)
        answer: str | None
        if calls is not None:
            content = "\n".join(filter(None, [content, tool_calls.describe(message)]))
            answer, form = calls, FORM_OK
        else:
            answer, form = final_answer(content, finish, templates)
        out.append(Candidate(index=start + i, content=content, answer=answer, finish_reason=finish,
                             logprob=mean_logprob(ch), confidence=measure(from_openai(ch.get("logprobs"))),
                             form=form))
    return out


def answer(upstream: dict[str, Any], ranked: list[Candidate], request: ChatCompletionRequest) -> dict[str, Any]:
    """The chat.completion to return: the top ``request.n`` (default 1) candidates, best first."""
    by_index = {i: ch for i, ch in enumerate(sorted(upstream["choices"], key=lambda c: int(c.get("index", 0))))}
    choices = []
    for rank, cand in enumerate(ranked[: request.n or 1]):
        ch = dict(by_index[cand.index])
        ch["index"] = rank
        if not request.logprobs:
            ch["logprobs"] = None
        elif ch.get("logprobs") and not request.top_logprobs:  # the client asked for none of these
            content = ch["logprobs"].get("content") or []
            ch["logprobs"] = {**ch["logprobs"], "content": [{**t, "top_logprobs": []} for t in content]}
        choices.append(ch)
    out = {k: v for k, v in upstream.items() if k not in ("choices", "usage")}
    out["choices"] = choices
    return out
