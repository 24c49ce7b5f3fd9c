"""Drawing N candidates in one upstream call, and building the answer from the ranked ones."""

from __future__ import annotations

from typing import Any

from protocol.errors import UpstreamError
from protocol.wire import ChatCompletionRequest
from strategies import tool_calls
from strategies.answers import extract
from strategies.base import Candidate, StrategyContext


def mean_logprob(choice: dict[str, Any]) -> float | None:
    content = (choice.get("logprobs") or {}).get("content") or []
    lps = [float(e["logprob"]) for e in content if isinstance(e, dict) and e.get("logprob") is not None]
    return sum(lps) / len(lps) if lps else None


async def sample(request: ChatCompletionRequest, ctx: StrategyContext, n: int, temperature: float,
                 notes: list[str]) -> tuple[dict[str, Any], list[Candidate]]:
    """N candidates from ONE upstream call with ``n=N`` (vLLM shares the prompt's KV cache).

    The client's sampling parameters are kept; a temperature of 0 (or none) would make every
    candidate the same, so it is replaced by ``temperature`` and the trace says so.
    """
    body = {k: v for k, v in ctx.body.items() if k not in ("stream", "stream_options")}
    body["n"] = n
    if not request.temperature:
        body["temperature"] = temperature
        notes.append(f"client temperature {request.temperature!r} replaced by {temperature} to sample {n} candidates")
    if not request.logprobs:
        body["logprobs"] = True  # mean token logprob breaks ties; stripped from the answer
    data = await ctx.chat(body, purpose="candidates")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UpstreamError("the upstream returned no candidates")
    out = []
    for i, ch in enumerate(sorted(choices, key=lambda c: int(c.get("index", 0)))):
        message = ch.get("message") or {}
        content = message.get("content") or ""
        # A candidate that calls tools votes with its calls (same functions, equivalent arguments);
        # verifiers read the calls as text after whatever it said.
        calls = tool_calls.key(message)
        if calls is not None:
            content = "\n".join(filter(None, [content, tool_calls.describe(message)]))
        out.append(Candidate(index=i, content=content, answer=calls if calls is not None else extract(content),
                             finish_reason=ch.get("finish_reason"), logprob=mean_logprob(ch)))
    return data, out


def answer(upstream: dict[str, Any], ranked: list[Candidate], request: ChatCompletionRequest) -> dict[str, Any]:
    """The chat.completion to return: the top ``request.n`` (default 1) candidates, best first."""
    by_index = {i: ch for i, ch in enumerate(sorted(upstream["choices"], key=lambda c: int(c.get("index", 0))))}
    choices = []
    for rank, cand in enumerate(ranked[: request.n or 1]):
        ch = dict(by_index[cand.index])
        ch["index"] = rank
        if not request.logprobs:
            ch["logprobs"] = None
        choices.append(ch)
    out = {k: v for k, v in upstream.items() if k not in ("choices", "usage")}
    out["choices"] = choices
    return out
