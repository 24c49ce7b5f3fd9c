"""The request pipeline behind the completion routes, as stages:

admit (capacity: a 429 before any work) -> parse (body read, JSON, wire model) -> choose the
strategy (and map the model) -> route (memory recall, the tenant's adapter: a typed ``Routing``)
-> run the strategy against the upstream -> render (bytes, JSON or SSE, usage summed over every
upstream call) -> metrics and events, off the critical path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from protocol.errors import (
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    RateLimited,
    SharpenError,
    UpstreamError,
)
from protocol.events import EventBus, RequestEvent, Sample
from protocol.wire import SHARPEN_FIELDS, ChatCompletionRequest, CompletionRequest, parse_json, validate
from server import render
from server.auth import Principal
from server.metrics import Metrics
from server.models import ModelRegistry
from server.pool import UpstreamPool
from server.redact import clip
from server.replay import Replay
from server.routing import Routing, acquire_model
from server.settings import Settings
from server.streaming import (
    DONE,
    KEEPALIVE,
    ClientGone,
    SSEResponse,
    UsageSniffer,
    cancel_on_disconnect,
    outcome_status,
    sse_event,
)
from server.traffic import Finished, Traffic
from server.upstream import Upstream
from strategies.base import AnyRequest, Caps, Strategy, StrategyContext, StrategyResult
from strategies.registry import StrategyRegistry

if TYPE_CHECKING:
    from adapt.service import AdaptationService

log = logging.getLogger(__name__)

_REQUEST_MODELS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/chat/completions": ChatCompletionRequest,
    "/completions": CompletionRequest,
}
_DRAIN_CAP = 1 << 30  # past this a too-large body is not even read to the end


@dataclass
class Job:
    """One admitted request on its way through the pipeline."""

    endpoint: str
    req: AnyRequest
    strategy: Strategy[Any]
    ctx: StrategyContext
    t0: float
    routing: Routing = field(default_factory=Routing)
    uncertainty: float | None = None  # the strategy's, once known (for the traffic record)

    @property
    def with_trace(self) -> bool:
        return isinstance(self.req, ChatCompletionRequest) and self.req.trace


class ProxyService:
    """Answers completion requests; one instance per app."""

    def __init__(self, settings: Settings, upstream: Upstream, models: ModelRegistry,
                 strategies: StrategyRegistry, metrics: Metrics, events: EventBus, replay: Replay | None = None,
                 adapt: AdaptationService | None = None, traffic: Traffic | None = None) -> None:
        self.settings = settings
        self.traffic = traffic
        self.upstream = upstream
        # several replicas: each request's calls are pinned to one (none of this with one upstream)
        self._pool = upstream if isinstance(upstream, UpstreamPool) else None
        self.models = models
        self.strategies = strategies
        self.metrics = metrics
        self.events = events
        self.replay = replay
        self.adapt = adapt
        self._in_flight = 0
        c = settings.strategies
        self._caps = Caps(max_n=c.max_n, max_verifier_calls=c.max_verifier_calls,
                          max_upstream_tokens=c.max_upstream_tokens, deadline_s=c.deadline_s)
        strategies.check_defaults(c.options, self._caps)  # a bad calibrated weights file fails the start

    async def handle(self, endpoint: str, request: Request, principal: Principal) -> Response | SSEResponse:
        t0 = time.perf_counter()
        admitted, name = False, "none"
        try:
            self._admit()
            admitted = True
            req, body = await self._parse(endpoint, request)
            strategy, model_name = self._choose(endpoint, body, request)
            name = strategy.name
            strategy.admit(req)
            job = await self._route(endpoint, req, body, strategy, model_name, principal, t0)
        except BaseException as exc:
            if admitted:
                self._release()
            # refused before any work (429, 400, 404, 413): counted, or the error rate hides them
            self.metrics.requests.labels(endpoint, name, str(outcome_status(exc))).inc()
            raise
        return await self._run(job, request)

    # -- stages --------------------------------------------------------------------------------

    def _admit(self) -> None:
        """The capacity check, first: a refused request costs no body read, model resolution or
        memory recall. Takes a slot, released in ``_finish`` (or at once if a later stage fails)."""
        if self._in_flight >= self.settings.max_concurrency:
            raise RateLimited(f"Over the limit of {self.settings.max_concurrency} requests in flight; retry shortly.")
        self._in_flight += 1
        self.metrics.in_flight.inc()

    def _release(self) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.dec()

    async def _parse(self, endpoint: str, request: Request) -> tuple[AnyRequest, dict[str, Any]]:
        body = parse_json(await self.read_body(request))
        req: AnyRequest = validate(_REQUEST_MODELS[endpoint], body)
        return req, body

    async def read_body(self, request: Request) -> bytes:
        """The body, refusing (413) anything over the limit without holding it in memory."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        parts: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_big = True
            if too_big:
                # Drain so the client can read our answer instead of a reset mid-upload.
                if size > _DRAIN_CAP:
                    break
                continue
            parts.append(chunk)
        if too_big:
            raise PayloadTooLarge(f"The request body is over the {limit}-byte limit.")
        return b"".join(parts)

    def _choose(self, endpoint: str, body: dict[str, Any], request: Request) -> tuple[Strategy[Any], str | None]:
        """The strategy and the model name. The strategy comes from the body field, else the
        ``X-Sharpen-Strategy`` header, else a ``model@strategy`` suffix, else a preset alias,
        else the server default (passthrough unless configured)."""
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("'model' must be a string.", param="model")
        spec: str | dict[str, Any] | None = body.get("strategy")
        if spec is None:
            spec = request.headers.get("x-sharpen-strategy")
        if model and "@" in model:
            base, _, suffix = model.rpartition("@")
            if suffix in self.strategies:
                model = base
                spec = spec if spec is not None else suffix
        cfg = self.settings.strategies
        preset = cfg.presets.get(model) if model else None
        if preset is not None:
            model = preset.model
            spec = spec if spec is not None else preset.strategy
        if spec is None:
            spec = cfg.default if endpoint == "/chat/completions" else "passthrough"
        return self.strategies.build(spec, endpoint=endpoint, defaults=cfg.options, caps=self._caps), model

    async def _route(self, endpoint: str, req: AnyRequest, body: dict[str, Any], strategy: Strategy[Any],
                     model_name: str | None, principal: Principal, t0: float) -> Job:
        """Maps the model, builds the strategy's context, recalls memories and picks the tenant's
        adapter: everything the strategy needs, and the ``Routing`` the server keeps beside it."""
        upstream_model = await self.models.resolve(model_name)
        if self.adapt is not None and not self.adapt.visible(principal.tenant, upstream_model):
            # Another tenant's adapter is as unknown to this tenant as a missing model.
            raise ModelNotFound(f"The model '{clip(str(model_name))}' does not exist.", param="model")
        fwd = {k: v for k, v in body.items() if k not in SHARPEN_FIELDS} if _has_own(body) else body
        fwd["model"] = upstream_model
        budget, deadline = strategy.budget(self._caps)
        ctx = StrategyContext(upstream=self.upstream, body=fwd, endpoint=endpoint, model=upstream_model,
                              tenant=principal.tenant, deadline=time.monotonic() + deadline,
                              max_upstream_tokens=None if strategy.streams_natively else budget,
                              resolver=self._resolver(principal.tenant))
        job = Job(endpoint, req, strategy, ctx, t0)
        if isinstance(req, ChatCompletionRequest):
            await self._recall(job, req, body, principal)
        if self.adapt is not None:
            # The tenant's active adapter, if any, answers for the base model; counted in flight
            # (released in _finish) so a replaced version is unloaded only once idle. Last: nothing
            # after it can fail before the job is run.
            routed = await acquire_model(self.adapt, principal.tenant, upstream_model, body, job.routing,
                                         self.metrics.adapter_scope)
            if routed != upstream_model:
                ctx.body["model"] = ctx.model = job.routing.adapter = routed
        if self._pool is not None:  # several replicas: this request's calls stay on one
            ctx.upstream = self._pool.pin(ctx.body)
        return job

    def _resolver(self, tenant: str) -> Callable[[str], Awaitable[str]]:
        """Resolves the models a strategy's own calls name (``verifier_model``, ``critic_model``)
        with the same visibility as the request's ``model``: another tenant's adapter is unknown."""

        async def resolve(name: str) -> str:
            model = await self.models.resolve(name)
            if self.adapt is not None and not self.adapt.visible(tenant, model):
                raise ModelNotFound(f"The model '{clip(name)}' does not exist.", param="strategy")
            return model

        return resolve

    async def _recall(self, job: Job, req: ChatCompletionRequest, body: dict[str, Any], principal: Principal) -> None:
        if self.replay is None:
            if req.memory not in (None, False):
                raise InvalidRequest("Memory is not enabled on this server.", param="memory")
            return
        mem = self.replay.options(req)
        job.routing.remember = mem.remember
        if mem.recall:
            if job.ctx.body is body:
                job.ctx.body = dict(body)
            job.req, job.routing.memory = await self.replay.inject(principal.tenant, req, job.ctx.body, mem.k)

    async def _run(self, job: Job, request: Request) -> Response | SSEResponse:
        strategy, ctx, req = job.strategy, job.ctx, job.req
        if req.stream and not strategy.streams_natively:
            return self._stream_when_done(job)
        try:
            t_run = time.perf_counter()
            result = await cancel_on_disconnect(request.receive, strategy.run(req, ctx), request.scope)
            ran = time.perf_counter() - t_run
        except BaseException as exc:
            self._finish(job, exc)
            raise
        if result.stream is not None:
            return self._stream(job, result, ran)
        try:
            resp = self._respond(job, result, time.perf_counter() - job.t0)
        except BaseException as exc:
            self._finish(job, exc)
            raise
        overhead = time.perf_counter() - job.t0 - ran
        resp.headers["x-sharpen-overhead-ms"] = f"{overhead * 1000:.3f}"
        self.metrics.overhead.labels(job.endpoint).observe(overhead)
        self._finish(job, None, result)
        return resp

    # -- render ------------------------------------------------------------------------------

    @staticmethod
    def _render(job: Job, result: StrategyResult, wall_s: float) -> dict[str, Any]:
        if result.response is None:
            raise UpstreamError(f"strategy '{job.strategy.name}' produced no answer")
        return render.finish(result.response, job.strategy, job.ctx, result, job.routing,
                             with_trace=job.with_trace, wall_s=wall_s)

    def _respond(self, job: Job, result: StrategyResult, wall_s: float) -> Response:
        # Passthrough bytes go back untouched unless the client asked for the trace, or memory
        # was injected (the answer then says which memories were used).
        if result.raw is not None and not (job.routing.memory is not None or job.with_trace):
            return Response(result.raw, media_type="application/json")
        body = self._render(job, result, wall_s)
        return Response(orjson.dumps(body), media_type="application/json")

    def _stream_when_done(self, job: Job) -> SSEResponse:
        """A strategy that must finish before answering: the SSE response starts at once, sends
        keep-alive comments while the strategy works, then the chosen answer as content chunks
        and the usage. A client that leaves cancels the strategy and its upstream calls."""
        strategy, ctx, req = job.strategy, job.ctx, job.req
        keepalive = self.settings.strategies.keepalive_s
        outcome: list[BaseException | None] = [None]

        async def produce() -> AsyncIterator[bytes]:
            task = asyncio.get_running_loop().create_task(strategy.run(req, ctx))
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=keepalive)
                    if not task.done():
                        yield KEEPALIVE
                result = task.result()
                body = self._render(job, result, time.perf_counter() - job.t0)
                # The whole answer is ready: one write, not one per event.
                yield b"".join([*(sse_event(event) for event in render.chunks(body)), DONE])
                self._publish(job, result)
            except BaseException as exc:
                outcome[0] = exc
                raise
            finally:
                if not task.done():
                    task.cancel()

        def on_close(gone: bool, failure: SharpenError | None) -> None:
            if gone:
                self.metrics.disconnects.inc()
            self._finish(job, asyncio.CancelledError() if gone else failure or outcome[0])

        overhead = time.perf_counter() - job.t0
        return SSEResponse(produce(), on_close=on_close,
                           headers=[(b"x-sharpen-overhead-ms", f"{overhead * 1000:.3f}".encode())])

    def _stream(self, job: Job, result: StrategyResult, ran: float) -> SSEResponse:
        assert result.stream is not None
        ctx = job.ctx
        opened = time.monotonic() - ran  # when the strategy opened the upstream stream (monotonic, as record wants)
        sniffer = UsageSniffer()
        overhead = time.perf_counter() - job.t0 - ran
        self.metrics.overhead.labels(job.endpoint).observe(overhead)

        def on_close(gone: bool, failure: SharpenError | None) -> None:
            error = None if failure is None else failure.message
            ctx.record("answer", ctx.body, sniffer.usage(), opened, error=error)
            exc: BaseException | None = failure
            if gone:
                self.metrics.disconnects.inc()
                exc = asyncio.CancelledError()
            self._finish(job, exc)

        return SSEResponse(result.stream.chunks(), tap=sniffer.feed, on_close=on_close,
                           headers=[(b"x-sharpen-overhead-ms", f"{overhead * 1000:.3f}".encode())])

    # -- after -------------------------------------------------------------------------------

    def _publish(self, job: Job, result: StrategyResult) -> None:
        """Hands the finished request to the event stream (adaptation, metrics); never blocks."""
        req, strategy, ctx = job.req, job.strategy, job.ctx
        if result.uncertainty is not None:
            self.metrics.uncertainty.labels(strategy.name).observe(result.uncertainty.score)
            job.uncertainty = result.uncertainty.score
        if not self.events.active or not isinstance(req, ChatCompletionRequest) or result.response is None:
            return
        choices = result.response.get("choices") or [{}]
        answer = (choices[0].get("message") or {}).get("content") if isinstance(choices[0], dict) else None
        # The messages as sent upstream (the client's, plus any recalled memory) are already plain
        # dicts: re-dumping the validated models cost more than the rest of the event.
        sent = ctx.body.get("messages")
        messages = sent if isinstance(sent, list) else [m.model_dump(exclude_none=True) for m in req.messages]
        self.events.publish(RequestEvent(
            request_id=str(result.response.get("id", "")), tenant=ctx.tenant, model=ctx.model, strategy=strategy.name,
            messages=messages, answer=answer,
            uncertainty=result.uncertainty, usage=ctx.usage.model_dump(), remember=job.routing.remember,
            memory_used=job.routing.memory_ids(),
            samples=[Sample(c.content, c.answer, c.finish_reason, c.logprob, c.program)
                     for c in result.candidates] if result.sampled else []))

    def _finish(self, job: Job, exc: BaseException | None, result: StrategyResult | None = None) -> None:
        """Metrics (and the event) for one finished request: success, failure or disconnect;
        releases its slot and its adapter."""
        endpoint, strategy, ctx, t0 = job.endpoint, job.strategy, job.ctx, job.t0
        if result is not None:
            self._publish(job, result)
        if self.adapt is not None and job.routing.acquired is not None:
            self.adapt.release(job.routing.acquired)
            job.routing.acquired = None
        self._release()
        m = self.metrics
        status = "200" if exc is None else str(outcome_status(exc))
        if isinstance(exc, UpstreamError):
            m.upstream_errors.labels(type(exc).__name__).inc()
        elif isinstance(exc, ClientGone):
            m.disconnects.inc()
        latency = time.perf_counter() - t0
        m.requests.labels(endpoint, strategy.name, status).inc()
        m.latency.labels(endpoint, strategy.name).observe(latency)
        u = ctx.usage
        if self.traffic is not None:
            self.traffic.observe(Finished(ctx.tenant, endpoint, strategy.name, int(status), latency, u.prompt_tokens,
                                          u.completion_tokens, len(ctx.calls), job.uncertainty))
        if u.total_tokens:
            m.count_tokens(ctx.model, u.prompt_tokens, u.completion_tokens)
        m.count_strategy(strategy.name, u.prompt_tokens, u.completion_tokens, len(ctx.calls))
        for call in ctx.calls:
            m.upstream_calls.labels(call.purpose).inc()


def _has_own(body: dict[str, Any]) -> bool:
    return any(k in body for k in SHARPEN_FIELDS)
