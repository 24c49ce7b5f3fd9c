"""Every route sharpen has no strategy for, forwarded to the upstream as it came.

Embeddings, responses, audio, score/rerank, pooling, classify, tokenize/detokenize and anything
else the upstream serves under ``/v1``, plus vLLM's top-level inference routes: the method, the
body, the query string and the headers that matter go up unchanged; the status, the headers that
matter and the body (streamed as it arrives) come back unchanged, the upstream's error bodies
included. sharpen adds what it adds everywhere: the key check, the tenant check on the model a
body names (another tenant's adapter is as unknown as a missing model), the body-size limit,
the concurrency limit, metrics and the overhead header; its own errors have the OpenAI shape.

The upstream's operator routes (runtime LoRA loading, cache resets, sleep and wake-up,
profiling, weight updates, scaling, RPC) change the server and are never forwarded: they are as
unknown to a client as any other route sharpen does not serve.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from protocol.errors import ModelNotFound, NotFound, RateLimited
from server.auth import Principal
from server.metrics import Metrics
from server.streaming import outcome_status
from server.traffic import Finished, Traffic
from server.upstream import Upstream, UpstreamReply

if TYPE_CHECKING:
    from adapt.service import AdaptationService

# sharpen's own routes: reaching the forwarder means the method was wrong (405, not forwarded).
OWN_ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET", "/v1/feedback": "POST"}
# vLLM's inference routes outside /v1 (its operator routes there are left out on purpose).
TOP_LEVEL = frozenset({"/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank", "/v2/rerank",
                       "/invocations", "/version"})
# Anything under /v1 whose name says it changes the server: never forwarded.
OPERATOR = re.compile(r"lora|adapter|reset|sleep|wake|profil|collective|rpc|scale|elastic|pause|resume|weight|cache|"
                      r"server_info|shutdown|admin|debug", re.IGNORECASE)
FORWARD_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_REQUEST_HEADERS = ("content-type", "accept", "x-request-id", "openai-beta")
_RESPONSE_HEADERS = ("content-type", "content-disposition", "x-request-id", "retry-after", "cache-control")
_MULTIPART_MODEL = re.compile(rb'name="model"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,512})\r\n')
STRATEGY = "forward"  # the strategy label forwarded requests carry in metrics and on the status page


def target(path: str) -> tuple[str, bool]:
    """The upstream path for a client's ``path`` and whether it is relative to the upstream's
    root (else to its ``/v1`` base); raises ``NotFound`` for what is not forwarded."""
    if path in TOP_LEVEL:
        return path, True
    if any(seg in (".", "..") for seg in path.split("/")):
        raise NotFound(f"Unknown route {path}.")  # the upstream would resolve it to somewhere else
    if path.startswith("/v1/") and len(path) > 4 and not OPERATOR.search(path[4:]):
        return path[3:], False
    raise NotFound(f"Unknown route {path}.")


def endpoint_label(path: str) -> str:
    """A bounded metric label: ``/v1/responses/resp_123/cancel`` counts as ``/responses``."""
    if path in TOP_LEVEL:
        return path
    parts = path[4:].split("/")
    return "/" + "/".join(parts[:2] if parts[0] == "audio" else parts[:1])


def model_of(body: bytes, content_type: str) -> str | None:
    """The model a forwarded body names (JSON, or a multipart form's ``model`` field)."""
    if not body:
        return None
    if content_type.startswith("multipart/form-data"):
        m = _MULTIPART_MODEL.search(body[:65536])
        return m.group(1).decode("utf-8", "replace").strip() if m else None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # the upstream says what is wrong with it, in its own words
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def usage_of(raw: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens from a JSON answer's ``usage`` (chat-style or responses-style)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 0, 0
    return _counts(data)


def stream_usage(tail: bytes) -> tuple[int, int]:
    """The same from the end of an event stream: the last data event that carries usage, at its
    top level (chat chunks) or in its ``response`` (the responses API's ``response.completed``)."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                data = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            got = _counts(data)
            if got == (0, 0) and isinstance(data, dict):
                got = _counts(data.get("response"))
            if got != (0, 0):
                return got
    return 0, 0


def _counts(data: object) -> tuple[int, int]:
    u = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(u, dict):
        return 0, 0

    def num(*keys: str) -> int:
        for k in keys:
            v = u.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return 0

    return num("prompt_tokens", "input_tokens"), num("completion_tokens", "output_tokens")


class _Tail:
    """The last ``cap`` bytes (or so) of a relayed stream, kept by reference."""

    def __init__(self, cap: int = 1 << 18) -> None:
        self.cap = cap
        self.parts: deque[bytes] = deque()
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self.size += len(chunk)
        while self.size - len(self.parts[0]) > self.cap:
            self.size -= len(self.parts.popleft())

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class Forwarder:
    """Relays one forwarded request; one instance per app."""

    def __init__(self, upstream: Upstream, metrics: Metrics, *, max_concurrency: int,
                 read_body: Callable[[Request], Awaitable[bytes]], traffic: Traffic | None = None,
                 adapt: AdaptationService | None = None) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.read_body = read_body
        self.traffic = traffic
        self.adapt = adapt
        self.in_flight = 0

    def _check_model(self, tenant: str, model: str | None) -> None:
        if model is not None and self.adapt is not None and not self.adapt.visible(tenant, model):
            raise ModelNotFound(f"The model '{model}' does not exist.", param="model")

    async def handle(self, request: Request, principal: Principal) -> Response:
        t0 = time.perf_counter()
        path = request.url.path
        if path in OWN_ROUTES:
            raise HTTPException(405, f"Method {request.method} not allowed on {path}.",
                                headers={"Allow": OWN_ROUTES[path]})
        up_path, root = target(path)
        label = endpoint_label(path)
        try:
            body = await self.read_body(request)
            content_type = request.headers.get("content-type", "")
            self._check_model(principal.tenant, model_of(body, content_type))
            if path.startswith("/v1/models/"):
                self._check_model(principal.tenant, path[len("/v1/models/"):])
            if self.in_flight >= self.max_concurrency:
                raise RateLimited(f"Over the limit of {self.max_concurrency} requests in flight; retry shortly.")
        except BaseException as exc:  # refused before the upstream: counted all the same
            self.metrics.requests.labels(label, STRATEGY, str(outcome_status(exc))).inc()
            raise
        query = request.url.query
        headers = {h: v for h in _REQUEST_HEADERS if (v := request.headers.get(h))}
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            t_up = time.perf_counter()
            reply = await self.upstream.forward(request.method, up_path + (f"?{query}" if query else ""),
                                                body or None, headers, root=root)
            upstream_s = time.perf_counter() - t_up
        except BaseException as exc:
            self._finish(principal, label, t0, outcome_status(exc), 0, 0, calls=1)
            raise
        out = {h: v for h in _RESPONSE_HEADERS if (v := reply.headers.get(h))}
        if "text/event-stream" in reply.headers.get("content-type", "") or _streamed(reply):
            overhead = time.perf_counter() - t0 - upstream_s
            out["x-sharpen-overhead-ms"] = f"{overhead * 1000:.3f}"
            self.metrics.overhead.labels(label).observe(overhead)
            return StreamingResponse(self._relay(reply, principal, label, t0), status_code=reply.status, headers=out)
        try:
            t_read = time.perf_counter()
            raw = await reply.read()
            upstream_s += time.perf_counter() - t_read
        except BaseException as exc:
            self._finish(principal, label, t0, outcome_status(exc), 0, 0, calls=1)
            raise
        prompt, completion = usage_of(raw) if reply.status < 400 else (0, 0)
        overhead = time.perf_counter() - t0 - upstream_s
        out["x-sharpen-overhead-ms"] = f"{overhead * 1000:.3f}"
        self.metrics.overhead.labels(label).observe(overhead)
        self._finish(principal, label, t0, reply.status, prompt, completion, calls=1)
        return Response(raw, status_code=reply.status, headers=out)

    async def _relay(self, reply: UpstreamReply, who: Principal, label: str, t0: float) -> AsyncIterator[bytes]:
        status = reply.status
        sse = "text/event-stream" in reply.headers.get("content-type", "")
        tail = _Tail()
        try:
            async for chunk in reply.chunks():
                if sse:
                    tail.feed(chunk)
                yield chunk
        except BaseException as exc:
            status = outcome_status(exc)
            raise
        finally:
            await reply.close()
            prompt, completion = stream_usage(tail.bytes()) if sse and status < 400 else (0, 0)
            self._finish(who, label, t0, status, prompt, completion, calls=1)

    def _finish(self, who: Principal, label: str, t0: float, status: int, prompt: int, completion: int,
                calls: int) -> None:
        self.in_flight -= 1
        m = self.metrics
        m.in_flight.dec()
        latency = time.perf_counter() - t0
        m.requests.labels(label, STRATEGY, str(status)).inc()
        m.latency.labels(label, STRATEGY).observe(latency)
        m.upstream_calls.labels(STRATEGY).inc(calls)
        m.count_strategy(STRATEGY, prompt, completion, calls)
        if self.traffic is not None:
            self.traffic.observe(Finished(who.tenant, label, STRATEGY, status, latency, prompt, completion, calls))


def _streamed(reply: UpstreamReply) -> bool:
    """Whether to relay as it arrives: anything that is not a small JSON or text answer
    (audio, files, chunked answers)."""
    ctype = reply.headers.get("content-type", "")
    return not (ctype.startswith("application/json") or ctype.startswith("text/"))
