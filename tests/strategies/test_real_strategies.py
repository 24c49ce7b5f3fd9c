"""self_consistency and best_of_n end to end on the real vLLM (SmolLM2-135M on CPU), through the
OpenAI SDK, streamed and not, checked from the upstream's side.

A second sharpen runs in front of the session's vLLM with its upstream transport wrapped so
that every call it makes is recorded with vLLM's own answer. The tests assert that the N
candidates came from ONE upstream call with ``n=N``, that the trace lists exactly the calls made,
and that the usage a client sees is the sum of what vLLM reported for each call. vLLM's
``/metrics`` confirms the same from the server: its ``vllm:request_params_n`` histogram gets one
observation per API request, with that request's ``n``.

(vLLM V1 fans an ``n=N`` request out to N sequences inside the engine, so ``request_success`` and
``prompt_tokens`` count N each; with prompts shorter than a KV block the prompt's prefill is not
shared between them either. Those counters cannot tell one ``n=N`` call from N calls; the ``n``
histogram can.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from server.app import create_app
from server.settings import load_settings
from server.transport import AiohttpTransport, TransportResponse
from server.upstream import Upstream
from strategies.verifiers.aspect import ASPECTS as ASPECT_TEXT
from tests.proxy_server import ProxyServer, free_port
from tests.real_backend import RealVLLM

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]

N = 4
MAX_TOKENS = 64
ASPECTS = ["approval", "math_steps", "logic_steps", "rederive"]
QUESTION = [{"role": "user", "content": "What is 7 + 5? Answer briefly and end with 'The answer is X.'"}]
SC = {"name": "self_consistency", "n": N}
BON = {"name": "best_of_n", "n": N, "verifiers": [*ASPECTS, "agreement"], "pal": 0}  # programs: real_selection
BON_2 = {"name": "best_of_n", "n": N, "verifiers": ["approval", "rederive", "agreement"], "pal": 0}  # cheaper, streamed


# ---- a sharpen whose upstream calls are recorded ----------------------------------------------


@dataclass
class Recorded:
    """One upstream call: the body sharpen sent and vLLM's answer (JSON, or the SSE bytes)."""

    url: str
    body: dict[str, Any]
    status: int
    raw: bytearray = field(default_factory=bytearray)

    @property
    def answer(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(bytes(self.raw))
        return data


class _RecordingResponse(TransportResponse):
    def __init__(self, inner: TransportResponse, rec: Recorded) -> None:
        self._inner = inner
        self._rec = rec
        self.status = inner.status
        self.content_type = inner.content_type
        self.headers = inner.headers

    async def read(self) -> bytes:
        data = await self._inner.read()
        self._rec.raw += data
        return data

    async def read_chunk(self) -> bytes:
        data = await self._inner.read_chunk()
        self._rec.raw += data
        return data

    async def close(self) -> None:
        await self._inner.close()


class RecordingTransport(AiohttpTransport):
    """sharpen's own transport, recording every completion call it sends and what came back."""

    def __init__(self) -> None:
        super().__init__(max_connections=64, connect_timeout=5.0)
        self.calls: list[Recorded] = []

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> TransportResponse:
        resp = await super().send(method, url, body, headers)
        if method != "POST" or not url.endswith("/completions"):
            return resp
        rec = Recorded(url, json.loads(body or b"{}"), resp.status)
        self.calls.append(rec)
        return _RecordingResponse(resp, rec)


class RecordingProxy(ProxyServer):
    """``ProxyServer`` with an injected, recording upstream transport."""

    def __init__(self, upstream_url: str) -> None:  # builds what ProxyServer.__init__ would, but its own app
        self.transport = RecordingTransport()
        # No distillation: memory's insight call goes upstream after the response, off the request's
        # path, and landed inside a test's window of vLLM's counters (CI: vLLM saw 18, sharpen sent 17).
        self.settings = load_settings(upstream={"url": upstream_url}, memory={"distill": False})
        self.port = free_port()
        self.app = create_app(self.settings, upstream=Upstream(upstream_url, self.settings.upstream,
                                                               transport=self.transport))
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, loop="asyncio", http="httptools",
                             log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)


@pytest.fixture(scope="module")
def recording(real_vllm: RealVLLM) -> Iterator[RecordingProxy]:
    with RecordingProxy(real_vllm.base_url) as p:
        yield p


@pytest.fixture(scope="module")
def client(recording: RecordingProxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=recording.url, api_key="unused", timeout=300, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(real_vllm: RealVLLM) -> str:
    return real_vllm.served_name


# ---- vLLM's /metrics ------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^(vllm:[a-z_]+)(?:\{([^}]*)\})?\s+(\S+)$')


def _metrics(vllm: RealVLLM) -> dict[tuple[str, str], float]:
    """vLLM's counters summed over every label but ``le``: {(name, le): value}."""
    root = vllm.base_url.removesuffix("/v1")
    text = httpx.get(root + "/metrics", timeout=10, trust_env=False).text
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        le = re.search(r'le="([^"]*)"', m.group(2) or "")
        key = (m.group(1), le.group(1) if le else "")
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


class NHistogram:
    """Deltas of ``vllm:request_params_n`` (one observation per API request, valued at its n)."""

    def __init__(self, vllm: RealVLLM) -> None:
        self.vllm = vllm
        # An earlier test's (aborted) request may still be finishing, and its stats land a moment
        # after it has: start from an idle server whose n histogram has stopped moving.
        # On a loaded 2-core CI machine the logger lagged more than 0.5 s (an earlier test's request
        # was counted inside the next test's window), so the count must hold still for 2.5 s.
        deadline = time.monotonic() + 45
        key = ("vllm:request_params_n_count", "")
        before = _metrics(vllm)
        still = 0
        while time.monotonic() < deadline and still < 5:
            time.sleep(0.5)
            now = _metrics(vllm)
            idle = now.get(("vllm:num_requests_running", ""), 0) == 0 and \
                now.get(("vllm:num_requests_waiting", ""), 0) == 0
            still = still + 1 if idle and now.get(key) == before.get(key) else 0
            before = now
        self.before = before

    def delta(self, expected_requests: int, timeout: float = 15) -> tuple[float, float, float]:
        """(requests, sum of n, requests with n = 1), once ``expected_requests`` are counted."""
        deadline = time.monotonic() + timeout
        while True:
            now = _metrics(self.vllm)

            def d(name: str, le: str = "", now: dict[tuple[str, str], float] = now) -> float:
                return now.get((name, le), 0.0) - self.before.get((name, le), 0.0)

            count = d("vllm:request_params_n_count")
            if count >= expected_requests or time.monotonic() > deadline:
                return count, d("vllm:request_params_n_sum"), d("vllm:request_params_n_bucket", "1.0")
            time.sleep(0.2)  # the stats logger runs after the response has gone out


# ---- checks ---------------------------------------------------------------------------------


def _usage_tuple(u: Mapping[str, Any] | Any) -> tuple[int, int, int]:
    if not isinstance(u, Mapping):
        u = u.model_dump()
    return int(u["prompt_tokens"]), int(u["completion_tokens"]), int(u["total_tokens"])


def check_upstream(calls: list[Recorded], sharpen: dict[str, Any], usage: Any, n: int = N) -> Recorded:
    """One n=N candidates call; the trace lists exactly the calls made; usage sums vLLM's.
    Returns the candidates call."""
    trace = sharpen["trace"]
    assert all(c.status == 200 for c in calls)
    assert not any(c.body.get("stream") for c in calls), "strategies make non-streamed upstream calls"
    multi = [c for c in calls if (c.body.get("n") or 1) > 1]
    assert len(multi) == 1, f"expected ONE upstream call with n>1, got {[c.body.get('n') for c in calls]}"
    cand = multi[0]
    assert cand.body["n"] == n
    assert len(cand.answer["choices"]) == n
    traced = [c for c in trace["calls"] if c["purpose"] == "candidates"]
    assert len(traced) == 1 and traced[0]["n"] == n and traced[0]["ok"]
    assert len(trace["calls"]) == len(calls) == sharpen["upstream_calls"]
    # Per call, the usage the trace recorded is what vLLM reported (calls run concurrently: compare as multisets).
    reported = [_usage_tuple(c.answer["usage"]) for c in calls]
    assert Counter(_usage_tuple(c["usage"]) for c in trace["calls"]) == Counter(reported)
    assert _usage_tuple(traced[0]["usage"]) == _usage_tuple(cand.answer["usage"])
    # The client's usage is the sum over every upstream call.
    total = tuple(sum(r[i] for r in reported) for i in range(3))
    assert _usage_tuple(usage) == total
    # The trace's candidates are vLLM's n choices, in order.
    contents = [(ch["message"].get("content") or "") for ch in sorted(cand.answer["choices"], key=lambda c: c["index"])]
    assert [c["content"] for c in trace["candidates"]] == contents
    return cand


def check_metrics(hist: NHistogram, calls: list[Recorded], n: int = N) -> None:
    requests, n_sum, n_one = hist.delta(len(calls))
    assert requests == len(calls), f"vLLM saw {requests} API requests, sharpen sent {len(calls)}"
    assert n_one == len(calls) - 1, "vLLM saw more than one request with n>1"
    assert n_sum == n + len(calls) - 1, "vLLM's one request with n>1 did not have n=N"


def check_verifier_calls(calls: list[Recorded], candidates: list[str], aspects: list[str]) -> None:
    """N calls per aspect, each about one candidate; every aspect checks every candidate once
    (candidates may repeat: a small model often says the same thing twice)."""
    verify = [c for c in calls if (c.body.get("n") or 1) == 1]
    assert len(verify) == len(aspects) * len(candidates)
    seen: dict[str, Counter[str]] = {a: Counter() for a in aspects}
    for c in verify:
        assert c.body["temperature"] == 0.0 and c.body["model"] == calls[0].body["model"]
        user = c.body["messages"][-1]["content"]
        head, _, task = user.rpartition("\n\nVerification task: ")
        aspect = next(a for a in aspects if task.startswith(ASPECT_TEXT[a]))
        seen[aspect][head.split("Proposed answer:\n", 1)[1]] += 1
    for aspect in aspects:
        assert seen[aspect] == Counter(candidates), aspect


def check_choice(sharpen: dict[str, Any], content: str, strategy: dict[str, Any]) -> None:
    """The answer is a candidate the strategy ranks first."""
    trace = sharpen["trace"]
    cands = trace["candidates"]
    assert content in [c["content"] for c in cands]
    chosen = next(c for c in cands if c["content"] == content)
    if strategy["name"] == "best_of_n":
        assert chosen["scores"]["verifiers"] == max(c["scores"]["verifiers"] for c in cands)
        assert set(trace["verifiers"]) == {f"aspect:{a}" if a != "agreement" else a for a in strategy["verifiers"]}
        assert not trace["all_verifiers_failed"]
        for c in cands:
            assert set(c["verdicts"]) == set(trace["verifiers"])
    else:
        if trace["majority_answer"] is not None and not any("universal" in n for n in trace["notes"]):
            assert chosen["answer"] == trace["majority_answer"]
    assert sharpen["uncertainty"] is not None and 0.0 <= sharpen["uncertainty"] <= 1.0


def _aspects(strategy: dict[str, Any]) -> list[str]:
    return [v for v in strategy["verifiers"] if v in ASPECT_TEXT]


# ---- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [SC, BON], ids=["self_consistency", "best_of_n"])
def test_strategy_non_stream(strategy: dict[str, Any], client: openai.OpenAI, model: str,
                             recording: RecordingProxy, real_vllm: RealVLLM) -> None:
    hist = NHistogram(real_vllm)
    recording.transport.calls.clear()
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=MAX_TOKENS,
                                       extra_body={"strategy": strategy, "trace": True})
    calls = list(recording.transport.calls)
    assert r.object == "chat.completion" and len(r.choices) == 1
    content = r.choices[0].message.content or ""
    assert content.strip()
    assert r.choices[0].logprobs is None  # asked for internally, not by the client
    sharpen = r.model_extra["sharpen"]
    assert sharpen["strategy"] == strategy["name"]
    cand = check_upstream(calls, sharpen, r.usage)
    assert cand.body["max_tokens"] == MAX_TOKENS and cand.body["model"] == model
    check_choice(sharpen, content, strategy)
    if strategy["name"] == "best_of_n":
        check_verifier_calls(calls, [c["content"] for c in sharpen["trace"]["candidates"]], _aspects(strategy))
    else:
        assert len(calls) == 1 or [c["purpose"] for c in sharpen["trace"]["calls"]] == ["candidates", "usc"]
    check_metrics(hist, calls)


@pytest.mark.parametrize("strategy", [SC, BON_2], ids=["self_consistency", "best_of_n"])
def test_strategy_stream(strategy: dict[str, Any], client: openai.OpenAI, model: str,
                         recording: RecordingProxy, real_vllm: RealVLLM) -> None:
    hist = NHistogram(real_vllm)
    recording.transport.calls.clear()
    stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"strategy": strategy, "trace": True})
    chunks = list(stream)
    calls = list(recording.transport.calls)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    tail = chunks[-1]
    assert tail.choices == [] and tail.usage is not None
    sharpen = tail.model_extra["sharpen"]
    check_upstream(calls, sharpen, tail.usage)
    check_choice(sharpen, content, strategy)
    if strategy["name"] == "best_of_n":
        check_verifier_calls(calls, [c["content"] for c in sharpen["trace"]["candidates"]], _aspects(strategy))
    check_metrics(hist, calls)


def test_model_suffix_on_the_shared_proxy(real_proxy: ProxyServer, model: str) -> None:
    """``model@self_consistency`` on the session's plain sharpen: the default n=8, in one call."""
    with openai.OpenAI(base_url=real_proxy.url, api_key="unused", timeout=300, max_retries=0) as c:
        r = c.chat.completions.create(model=f"{model}@self_consistency", messages=QUESTION, max_tokens=32,
                                      extra_body={"trace": True})
    trace = r.model_extra["sharpen"]["trace"]
    assert r.model == model
    assert [(c["purpose"], c["n"]) for c in trace["calls"]][:1] == [("candidates", 8)]
    assert len(trace["candidates"]) == 8
    summed = [sum(_usage_tuple(c["usage"])[i] for c in trace["calls"]) for i in range(3)]
    assert list(_usage_tuple(r.usage)) == summed
