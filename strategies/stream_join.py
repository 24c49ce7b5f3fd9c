"""A streamed ``n``-choice chat call put back together as its chunks arrive.

A strategy that may stop waiting for some choices (``strategies.pal``'s program deadline) streams
the call instead: each choice's text, token logprobs and finish reason are kept as they come, a
choice is known to be over the moment its ``finish_reason`` arrives, and the finished ones make a
``chat.completion`` whatever happens to the rest. Usage is counted per choice from vLLM's
``continuous_usage_stats`` (each chunk carries its choice's completion tokens so far), so a call
closed early still accounts the tokens it was sent; the final usage chunk, when it comes, wins.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from protocol.errors import UpstreamError

STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON objects of an SSE body's ``data:`` lines, up to ``[DONE]``; an error event
    (``{"error": ...}``) or a line that is not JSON raises ``UpstreamError``."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # comments (keep-alives), event names, blank separators
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamError("the upstream stream sent an event that is not JSON") from None
            if not isinstance(obj, dict):
                raise UpstreamError("the upstream stream sent an event that is not a JSON object")
            if "error" in obj:
                err = obj["error"]
                msg = err.get("message") if isinstance(err, dict) else str(err)
                raise UpstreamError(f"the upstream failed mid-stream: {msg}")
            yield obj


class StreamedChoices:
    """The choices of one streamed chat call so far: ``feed`` each event, then ``completion``
    for the finished ones (or any), ``usage`` for what was spent."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.texts: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[dict[str, Any]]] = {}
        self.finish: dict[int, str] = {}
        self.tokens: dict[int, int] = {}
        self.prompt_tokens = 0
        self.final_usage: dict[str, Any] | None = None

    def feed(self, event: dict[str, Any]) -> list[int]:
        """Takes one chunk; returns the indices of the choices it finished."""
        if not self.head:
            self.head = {k: event[k] for k in ("id", "created", "model") if k in event}
        usage = event.get("usage")
        choices = event.get("choices") or []
        if isinstance(usage, dict) and not choices:  # the final usage chunk: the whole call's
            self.final_usage = usage
        done = []
        for ch in choices:
            i = int(ch.get("index", 0))
            delta = ch.get("delta") or {}
            if delta.get("content"):
                self.texts.setdefault(i, []).append(delta["content"])
            lp = (ch.get("logprobs") or {}).get("content")
            if lp:
                self.logprobs.setdefault(i, []).extend(lp)
            if isinstance(usage, dict):  # continuous usage: this choice's completion tokens so far
                self.prompt_tokens = int(usage.get("prompt_tokens") or self.prompt_tokens)
                self.tokens[i] = max(self.tokens.get(i, 0), int(usage.get("completion_tokens") or 0))
            elif lp:
                self.tokens[i] = len(self.logprobs[i])
            if ch.get("finish_reason") and i not in self.finish:
                self.finish[i] = str(ch["finish_reason"])
                done.append(i)
        return done

    def choice(self, i: int, index: int) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": "".join(self.texts.get(i, []))},
                "logprobs": {"content": self.logprobs.get(i, [])} if i in self.logprobs else None,
                "finish_reason": self.finish.get(i)}

    def completion(self, indices: list[int]) -> dict[str, Any]:
        """A ``chat.completion`` of the choices ``indices`` (in that order, re-indexed from 0)."""
        return {**self.head, "object": "chat.completion",
                "choices": [self.choice(i, j) for j, i in enumerate(indices)], "usage": self.usage()}

    def usage(self) -> dict[str, Any]:
        if self.final_usage is not None:
            return self.final_usage
        completion = sum(self.tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}
