"""An in-process fake upstream: ``protocol.upstream.UpstreamAPI`` answered by a Python function,
no sockets, no threads. For fast unit tests of strategies (a strategy run in microseconds);
``tests/fakes/upstream.py`` is the HTTP fake for everything that crosses the wire.

    api = FakeAPI(lambda body, i: "The answer is 7.")
    result = await MCTS(MCTSOptions()).run(request, api.context(body))
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from protocol.errors import UpstreamStatusError
from strategies.base import StrategyContext

AnswerFn = Callable[[dict[str, Any], int], str]  # (request body, choice index) -> content


class FakeReply:
    """A finished answer (``protocol.upstream.Reply``)."""

    def __init__(self, body: bytes, content_type: str = "application/json") -> None:
        self._body = body
        self.headers: Mapping[str, str] = {"content-type": content_type}  # as protocol.upstream.Reply declares it

    async def read(self) -> bytes:
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    async def close(self) -> None:
        return None


class FakeAPI:
    """Answers chat completions with ``answer(body, i)`` for each of the ``n`` choices; counts
    a token per word so usage adds up; records every request body. ``fail`` makes the next
    calls answer an upstream error status."""

    def __init__(self, answer: AnswerFn | None = None, *, model: str = "fake") -> None:
        self.answer: AnswerFn = answer or (lambda body, i: "42")
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.fail = 0

    async def request(self, method: str, path: str, body: bytes | None = None, *, root: bool = False) -> FakeReply:
        data: dict[str, Any] = orjson.loads(body) if body else {}
        self.requests.append(data)
        if self.fail:
            self.fail -= 1
            raise UpstreamStatusError.from_upstream(500, b'{"error": {"message": "fake failure"}}')
        n = int(data.get("n") or 1)
        texts = [self.answer(data, i) for i in range(n)]
        prompt = sum(len(str(m.get("content", "")).split()) for m in data.get("messages", []))
        completion = sum(len(t.split()) for t in texts)
        return FakeReply(orjson.dumps({
            "id": f"chatcmpl-fake-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": data.get("model", self.model),
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop",
                         "logprobs": None} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }))

    def context(self, body: dict[str, Any], *, deadline_s: float = 30.0) -> StrategyContext:
        """A strategy context over this fake, as the proxy would build it for ``body``."""
        return StrategyContext(upstream=self, body=dict(body, model=self.model), endpoint="/chat/completions",
                               model=self.model, tenant="t", deadline=time.monotonic() + deadline_s)


class NoUpstream:
    """An upstream that fails the test if called (programmatic verifiers never call one)."""

    async def request(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("programmatic verifiers never call the upstream")


def offline_context() -> StrategyContext:
    """A strategy context whose upstream must not be used."""
    return StrategyContext(upstream=NoUpstream(), body={}, endpoint="/chat/completions", model="m", tenant="t",
                           deadline=time.monotonic() + 5)
