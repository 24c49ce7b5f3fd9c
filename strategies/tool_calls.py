"""Tool calls as answers: a candidate that calls tools votes with a canonical key of its calls.

Two candidates agree when they call the same functions with equivalent arguments: the
arguments are parsed as JSON and written back with sorted keys, no spaces, and integral floats
as integers (``{"b": 1.0, "a": "x"}`` and ``{"a":"x","b":1}`` agree); parallel calls agree as a
multiset (their order does not matter). Arguments that are not JSON are compared as stripped
text. The key is a string like any extracted answer, so every vote (majority, agreement,
weighted votes) counts tool calls without knowing about them; the chosen candidate's choice is
returned as the upstream gave it (``message.tool_calls``, ``finish_reason: "tool_calls"``).
"""

from __future__ import annotations

import json
from typing import Any

PREFIX = "tool_calls:"


def _normal(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {str(k): _normal(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_normal(x) for x in v]
    return v


def canonical_arguments(arguments: Any) -> str:
    """The arguments of one call in canonical JSON (or stripped text when not JSON)."""
    if isinstance(arguments, str):
        text = arguments
        try:
            arguments = json.loads(text)
        except ValueError:
            return text.strip()
    return json.dumps(_normal(arguments), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def calls_of(message: dict[str, Any]) -> list[tuple[str, str]]:
    """(function name, canonical arguments) for each tool call in an assistant message."""
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.append((fn["name"], canonical_arguments(fn.get("arguments") or "{}")))
    return out


def key(message: dict[str, Any]) -> str | None:
    """The vote key of a message's tool calls; None when it calls none."""
    calls = calls_of(message)
    if not calls:
        return None
    return PREFIX + json.dumps(sorted(calls), separators=(",", ":"), ensure_ascii=False)


def is_key(answer: str | None) -> bool:
    return answer is not None and answer.startswith(PREFIX)


def describe(message: dict[str, Any]) -> str:
    """The calls as text, for verifiers that read a candidate (``name({"arg":1})`` per line)."""
    return "\n".join(f"Calls the tool {name} with arguments {args}" for name, args in calls_of(message))
