"""Turns a strategy's result into the answer a client gets: usage summed over every upstream
call, the short ``sharpen`` summary, and on request the full trace."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from server.routing import Routing
from strategies.base import Strategy, StrategyContext, StrategyResult


def summary(strategy: Strategy[Any], ctx: StrategyContext, result: StrategyResult, routing: Routing
            ) -> dict[str, Any]:
    """The short ``sharpen`` object every strategy answer carries."""
    u = result.uncertainty
    out: dict[str, Any] = {
        "strategy": strategy.name,
        "upstream_calls": len(ctx.calls),
        "uncertainty": None if u is None else round(u.score, 4),
    }
    if routing.memory is not None:
        out["memory"] = routing.memory_ids()
    return out


def trace(strategy: Strategy[Any], ctx: StrategyContext, result: StrategyResult, routing: Routing,
          wall_s: float) -> dict[str, Any]:
    """The documented trace (README, "Strategies"): options, candidates, calls, uncertainty,
    notes, wall_seconds, the memories replayed and the adapter that answered (when any), then
    the strategy's own fields. Nothing else of the server's leaks in."""
    out: dict[str, Any] = {
        "options": strategy.options.model_dump(),
        "candidates": [asdict(c) for c in result.candidates],
        "calls": [
            {"purpose": c.purpose, "model": c.model, "n": c.n, "usage": c.usage.model_dump(),
             "seconds": round(c.seconds, 4), "ok": c.ok, "error": c.error}
            for c in ctx.calls
        ],
        "uncertainty": None if result.uncertainty is None else asdict(result.uncertainty),
        "notes": list(result.notes),
        "wall_seconds": round(wall_s, 4),
    }
    if routing.memory is not None:
        out["memory"] = routing.memory
    if routing.adapter is not None:
        out["adapter"] = routing.adapter
    if routing.scope is not None:
        out["adapter_scope"] = routing.scope
    return {**out, **result.extra_trace}


def finish(response: dict[str, Any], strategy: Strategy[Any], ctx: StrategyContext, result: StrategyResult,
           routing: Routing, *, with_trace: bool, wall_s: float) -> dict[str, Any]:
    """The final chat.completion object: honest usage and the sharpen summary (and trace)."""
    out = dict(response)
    out["usage"] = ctx.usage.model_dump()
    s = summary(strategy, ctx, result, routing)
    if with_trace:
        s["trace"] = trace(strategy, ctx, result, routing, wall_s)
    out["sharpen"] = s
    return out


def chunks(response: dict[str, Any], *, piece_chars: int = 24) -> list[dict[str, Any]]:
    """A finished chat.completion as chat.completion.chunk events: role, content in pieces,
    finish reason, then (empty choices) usage and the sharpen summary."""
    base = {"id": response.get("id", ""), "object": "chat.completion.chunk", "created": response.get("created", 0),
            "model": response.get("model", "")}
    out: list[dict[str, Any]] = []
    for ch in response.get("choices", []):
        i = ch.get("index", 0)
        text = (ch.get("message") or {}).get("content") or ""
        out.append({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
        for k in range(0, len(text), piece_chars):
            out.append({**base, "choices": [{"index": i, "delta": {"content": text[k : k + piece_chars]},
                                             "finish_reason": None}]})
        calls = (ch.get("message") or {}).get("tool_calls") or []
        if calls:  # whole, one chunk: the SDK's accumulator joins fragments by each call's index
            delta = [{"index": j, **{k: v for k, v in c.items() if k != "index"}} for j, c in enumerate(calls)]
            out.append({**base, "choices": [{"index": i, "delta": {"tool_calls": delta}, "finish_reason": None}]})
        out.append({**base, "choices": [{"index": i, "delta": {}, "finish_reason": ch.get("finish_reason")}]})
    tail = {**base, "choices": [], "usage": response.get("usage")}
    if "sharpen" in response:
        tail["sharpen"] = response["sharpen"]
    out.append(tail)
    return out
