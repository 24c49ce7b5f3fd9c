"""The strategy interface: ``async run(request, ctx) -> StrategyResult``.

A strategy turns one chat request into one answer, making whatever upstream calls it needs
through ``ctx`` (which counts their usage, enforces the request's deadline and token budget, and
records each call for the trace). Strategies never import the web app; the server builds the
context and turns the result into an HTTP response.

Contract for implementers:
- Make every upstream call through ``ctx.chat`` / ``ctx.chat_raw`` / ``ctx.open_stream`` so usage
  is honest; never hold a client of your own.
- Ask for N candidates in one call with ``n=N`` (vLLM shares the prompt's KV cache).
- Return ``StrategyResult`` with exactly one of ``response`` (a chat.completion object you built),
  ``raw`` (upstream bytes passed on unchanged) or ``stream`` (a live upstream SSE stream).
- Raise ``protocol.errors.SharpenError`` subclasses for failures a client should see.
- Say how many choices you can return (``max_choices``); the client's ``n`` is checked against it
  once, in ``admit``, with the same 400 for every strategy.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from protocol.uncertainty import Uncertainty
from protocol.upstream import Reply, UpstreamAPI
from protocol.wire import ChatCompletionRequest, CompletionRequest, Usage
from strategies.answers import FORM_OK
from strategies.confidence import Confidence

AnyRequest = ChatCompletionRequest | CompletionRequest


@dataclass
class UpstreamCall:
    """One upstream call made for a request, for the ledger and the trace."""

    purpose: str
    model: str
    n: int
    usage: Usage
    seconds: float
    ok: bool = True
    error: str | None = None


class StrategyOptions(BaseModel):
    """Options a request may set for a strategy; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    max_upstream_tokens: int | None = Field(default=None, ge=1)  # budget over every call of the request
    deadline_s: float | None = Field(default=None, gt=0)  # answer (or give up) within this many seconds


@dataclass(frozen=True)
class Caps:
    """Server-side limits a request's options may not exceed (400 when they do)."""

    max_n: int = 32
    max_verifier_calls: int = 256
    max_upstream_tokens: int = 500_000
    deadline_s: float = 900.0


@dataclass
class Candidate:
    """One candidate answer with whatever scores the strategy gave it."""

    index: int
    content: str
    answer: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    logprob: float | None = None
    confidence: Confidence | None = None  # token-logprob signals (strategies.confidence)
    form: int = FORM_OK  # well-formedness rank (strategies.answers.FORM_*); lower is better
    program: bool = False  # a program-aided candidate: ``answer`` is what its program printed


@dataclass
class StrategyResult:
    """What a strategy returns: ``response`` (a chat.completion object), or ``stream`` (a live
    upstream stream), or ``raw`` (upstream bytes to pass on unchanged, with ``response`` their
    parsed copy)."""

    response: dict[str, Any] | None = None
    raw: bytes | None = None
    stream: Reply | None = None
    candidates: list[Candidate] = field(default_factory=list)
    # True when ``candidates`` are independent samples of the request as sent (votes a labeller
    # may count as its own), not drafts conditioned on critiques or tree paths.
    sampled: bool = False
    uncertainty: Uncertainty | None = None
    notes: list[str] = field(default_factory=list)
    extra_trace: dict[str, Any] = field(default_factory=dict)


@dataclass
class StrategyContext:
    """Everything a strategy may use for one request."""

    upstream: UpstreamAPI
    body: dict[str, Any]  # the upstream-ready body: sharpen's fields removed, model mapped
    endpoint: str  # "/chat/completions" or "/completions": where the client's request went
    model: str  # the upstream model name (aliases already resolved)
    tenant: str
    deadline: float  # time.monotonic() by which the request must be answered
    max_upstream_tokens: int | None = None  # budget over every call of this request
    calls: list[UpstreamCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    resolver: Callable[[str], Awaitable[str]] | None = None  # client model name -> upstream name

    async def resolve(self, model: str) -> str:
        """The upstream name of a model a request names (e.g. a verifier model)."""
        return await self.resolver(model) if self.resolver is not None else model

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _check_budget(self) -> None:
        if self.max_upstream_tokens is not None and self.usage.total_tokens >= self.max_upstream_tokens:
            raise InvalidRequest(
                f"the request's upstream token budget ({self.max_upstream_tokens}) is spent",
                param="strategy",
                code="token_budget_exceeded",
            )

    def record(self, purpose: str, body: dict[str, Any], usage: dict[str, Any] | None, started: float,
               error: str | None = None) -> UpstreamCall:
        u = Usage()
        u.add(usage)
        self.usage.add(u)
        call = UpstreamCall(purpose, str(body.get("model", self.model)), int(body.get("n") or 1), u,
                            time.monotonic() - started, ok=error is None, error=error)
        self.calls.append(call)
        return call

    async def post_raw(self, path: str, body: dict[str, Any], *, purpose: str) -> tuple[bytes, dict[str, Any]]:
        """One non-streamed call to ``path``: returns the raw bytes and the parsed answer."""
        self._check_budget()
        body.setdefault("model", self.model)
        started = time.monotonic()
        left = self.remaining()
        try:
            if left <= 0:  # spent already (a tool ran to the deadline): no call starts after it
                raise TimeoutError
            async with asyncio.timeout(left):
                reply = await self.upstream.request("POST", path, orjson.dumps(body))
                raw = await reply.read()
        except TimeoutError:
            self.record(purpose, body, None, started, error="deadline")
            raise UpstreamTimeout("the request's deadline passed while waiting for the upstream") from None
        except Exception as exc:
            self.record(purpose, body, None, started, error=str(exc)[:200])
            raise
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            self.record(purpose, body, None, started, error="unreadable answer")
            raise UpstreamError("upstream answer is not a JSON object")
        self.record(purpose, body, data.get("usage"), started)
        return raw, data

    async def chat_raw(self, body: dict[str, Any], *, purpose: str) -> tuple[bytes, dict[str, Any]]:
        """One non-streamed chat call: returns the raw bytes and the parsed answer."""
        return await self.post_raw("/chat/completions", body, purpose=purpose)

    async def chat(self, body: dict[str, Any], *, purpose: str) -> dict[str, Any]:
        """One non-streamed chat call; returns the parsed chat.completion object."""
        return (await self.chat_raw(body, purpose=purpose))[1]

    async def open_stream(self, body: dict[str, Any], *, purpose: str, path: str = "/chat/completions") -> Reply:
        """Opens a streamed call; the caller relays it and accounts usage from its usage chunk.
        An answer that is not an event stream is a 502 here, before the client's stream starts
        (relayed, the SDK would see a 200 with no events and raise nothing)."""
        self._check_budget()
        body.setdefault("model", self.model)
        reply = await self.upstream.request("POST", path, orjson.dumps(body))
        ctype = reply.headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            await reply.close()
            raise UpstreamError(f"upstream answered a streamed request with {ctype or 'no content type'!r}, "
                                "not an event stream")
        return reply


OptionsT = TypeVar("OptionsT", bound=StrategyOptions)


class Strategy(abc.ABC, Generic[OptionsT]):
    """A test-time strategy. Subclasses set ``name`` and ``Options`` (the options type they are
    generic over) and implement ``run``.

    One instance serves one request: the constructor takes the validated options (already fitted
    to the server's caps by ``fit``).
    """

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    streams_natively: ClassVar[bool] = False  # True: can relay the upstream stream as it comes
    endpoints: ClassVar[frozenset[str]] = frozenset({"/chat/completions"})

    def __init__(self, options: OptionsT) -> None:
        self.options: OptionsT = options

    @classmethod
    def fit(cls, options: OptionsT, caps: Caps) -> OptionsT:
        """The options to run with: defaults the request did not set may be lowered to the caps
        (a default must not make a plain request fail on a capped server). Returns a copy; the
        default changes nothing."""
        return options

    def check(self, caps: Caps) -> None:
        """Raises ``InvalidRequest`` when the options exceed the server's caps. No side effects."""
        o = self.options
        if o.max_upstream_tokens is not None and o.max_upstream_tokens > caps.max_upstream_tokens:
            raise InvalidRequest(f"max_upstream_tokens is capped at {caps.max_upstream_tokens} on this server.",
                                 param="strategy.max_upstream_tokens")
        if o.deadline_s is not None and o.deadline_s > caps.deadline_s:
            raise InvalidRequest(f"deadline_s is capped at {caps.deadline_s:g} on this server.",
                                 param="strategy.deadline_s")

    def max_choices(self) -> int | None:
        """The most choices (the client's ``n``) this strategy returns; None: as many as the
        upstream does. One by default: the strategy builds one answer."""
        return 1

    def admit(self, request: AnyRequest) -> None:
        """Raises ``InvalidRequest`` for a request this strategy cannot answer. Called before
        ``run``, so a streamed request is refused with a plain 400 rather than mid-stream. The
        one place the client's ``n`` is checked."""
        limit = self.max_choices()
        if limit is not None and request.n is not None and request.n > limit:
            raise InvalidRequest(f"n={request.n} choices asked for, but the strategy '{self.name}' returns at most "
                                 f"{limit}.", param="n")

    def budget(self, caps: Caps) -> tuple[int, float]:
        """The request's upstream token budget and deadline (seconds), within the caps."""
        o = self.options
        return (o.max_upstream_tokens or caps.max_upstream_tokens, o.deadline_s or caps.deadline_s)

    @abc.abstractmethod
    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        """Answers ``request`` (validated). ``ctx.body`` is the client's JSON with sharpen's own
        fields removed and the model mapped: the exact body a plain upstream call would send."""
