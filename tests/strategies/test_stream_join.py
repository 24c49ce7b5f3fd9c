"""Putting a streamed n-choice chat call back together (strategies/stream_join.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from protocol.errors import UpstreamError
from strategies.stream_join import StreamedChoices, sse_events


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def _all(*parts: bytes) -> list[dict[str, Any]]:
    return [e async for e in sse_events(_chunks(*parts))]


def _event(i: int, text: str | None, finish: str | None = None, so_far: int | None = None) -> dict[str, Any]:
    ch: dict[str, Any] = {"index": i, "delta": {"content": text} if text is not None else {},
                          "logprobs": {"content": [{"token": text, "logprob": -0.5, "top_logprobs": []}]}
                          if text else None, "finish_reason": finish}
    ev: dict[str, Any] = {"id": "c1", "created": 5, "model": "m", "choices": [ch]}
    if so_far is not None:
        ev["usage"] = {"prompt_tokens": 10, "completion_tokens": so_far, "total_tokens": 10 + so_far}
    return ev


async def test_events_split_across_reads_comments_and_done() -> None:
    a, b = orjson.dumps({"x": 1}), orjson.dumps({"y": 2})
    body = b": keep-alive\n\ndata: " + a + b"\n\ndata: " + b + b"\n\ndata: [DONE]\n\ndata: {\"z\": 3}\n\n"
    # cut at every byte: the parser must not depend on how the reads fall
    assert await _all(*(body[i:i + 1] for i in range(len(body)))) == [{"x": 1}, {"y": 2}]


@pytest.mark.parametrize("line", [b"data: {not json\n\n", b"data: [1, 2]\n\n",
                                  b'data: {"error": {"message": "engine died"}}\n\n'])
async def test_a_bad_or_error_event_raises(line: bytes) -> None:
    with pytest.raises(UpstreamError):
        await _all(line)


def test_choices_assembled_with_finish_and_continuous_usage() -> None:
    got = StreamedChoices()
    assert got.feed(_event(0, "", None, 0) | {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) == []
    assert got.feed(_event(0, "print", None, 1)) == []
    assert got.feed(_event(1, "slow", None, 1)) == []
    assert got.feed(_event(0, "(7)", "stop", 2)) == [0]
    assert got.feed(_event(1, " still", None, 2)) == []
    assert got.feed(_event(0, None, "stop", 2)) == []  # a finish repeated is not a second finish
    out = got.completion([0])
    assert out["id"] == "c1" and out["object"] == "chat.completion"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "print(7)"},
                               "logprobs": {"content": [{"token": "print", "logprob": -0.5, "top_logprobs": []},
                                                        {"token": "(7)", "logprob": -0.5, "top_logprobs": []}]},
                               "finish_reason": "stop"}]
    # the unfinished choice's tokens were spent too: 2 + 2
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


def test_the_final_usage_chunk_wins_and_logprobs_count_without_usage() -> None:
    got = StreamedChoices()
    got.feed(_event(0, "a"))
    got.feed(_event(0, "b", "length"))
    assert got.usage()["completion_tokens"] == 2  # no usage sent: the tokens seen
    got.feed({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    assert got.usage() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert got.completion([0])["choices"][0]["finish_reason"] == "length"
