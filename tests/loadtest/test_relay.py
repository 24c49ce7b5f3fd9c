"""The bare relay that overhead.py measures sharpen against: it must really relay (whole and
streamed answers from the upstream), or the floor it reports means nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from loadtest.machine import python_speed
from loadtest.relay import Relay
from tests.fakes.upstream import FakeUpstream


async def _lifespan(app: Relay) -> None:
    sent: list[dict[str, Any]] = []
    msgs = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(msgs)

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_relays_whole_and_streamed_answers(fake_upstream: FakeUpstream) -> None:
    relay = Relay(fake_upstream.url)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=relay), base_url="http://relay") as c:
        assert (await c.get("/health")).status_code == 200
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        assert r.json()["choices"][0]["message"]["content"]
        s = await c.post("/v1/chat/completions", json={**body, "stream": True})
        events = [ln[6:] for ln in s.text.splitlines() if ln.startswith("data: ")]
        assert s.headers["content-type"].startswith("text/event-stream")
        assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"
    await _lifespan(relay)


def test_python_speed_is_a_positive_reading() -> None:
    t = python_speed(10_000)
    assert 0 < t < 5
    assert python_speed(1_000_000) > t  # a reading of work done: 100x the loop takes longer
    with pytest.raises(TypeError):
        python_speed("many")  # type: ignore[arg-type]
