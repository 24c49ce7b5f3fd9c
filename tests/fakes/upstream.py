"""An in-process fake of vLLM's OpenAI-compatible server, for the project's own tests.

`FakeUpstream` is a real aiohttp HTTP server on 127.0.0.1 running on its own event loop in a
background thread, so the same instance serves sync tests, async tests and a proxy under test
alike. It records every request, scripts its answers, and misbehaves on demand.

Content rule (shared with the stdlib fake in shared/checks/fake_upstream.py, which external checks
rely on): choice i says "w0 w1 ... The answer is {answers[i % len(answers)]}." and a prompt that
mentions "verif" or "critique" gets " FINAL VERIFICATION ANSWER: True" appended.

Tokens are whitespace-delimited words ("w0", " w1", ...): a choice of `length` tokens has that many
stream chunks, `max_tokens` truncates it (finish_reason "length"), and usage counts them.

Knobs, as attributes (`fake.fault = "drop"`) or per request via the header
`X-Fake: fault=drop_mid,ttft=0.05,tok=0.01,len=20,fail_n=2`:
  fault   none | drop | hang | garbage | drop_mid | slow | <HTTP status, e.g. 500, 503, 429>
  ttft    seconds before the first chunk (stream; headers go out at once) or before the
          response headers (non-stream, which also waits `tok` per further token)
  tok     seconds between stream chunks
  len     tokens per choice of the default content
  fail_n  the first K requests carrying this exact header value fail with 500; the attribute
          form `fake.fail_n = K` fails the next K completion requests
The attribute `fault` applies to completion endpoints only (unless `fault_scope = "all"`), so the
proxy's health and model polling keep working; a header fault applies to whatever carries it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from aiohttp import web

ScriptFn = Callable[[dict[str, Any], int], str]
"""(request body, choice index) -> the full content of that choice."""

LogprobFn = Callable[[dict[str, Any], int, int, str], float]
"""(request body, choice index, token index, token) -> logprob of the sampled token."""

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
COMPLETION_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH})
# Routes the fake echoes (what a forwarding proxy sent on), as vLLM serves them.
ECHO_PREFIXES = ("/v1/responses", "/v1/audio/", "/v1/score", "/v1/rerank", "/v1/classify", "/tokenize",
                 "/detokenize", "/pooling", "/classify", "/score", "/rerank", "/v2/rerank", "/invocations", "/version")

VERIFY_SUFFIX = " FINAL VERIFICATION ANSWER: True"
_VERIFY_RE = re.compile(r"verif|critique", re.IGNORECASE)
# A token is a word with the whitespace before it, so joining tokens rebuilds the content.
_TOKEN_RE = re.compile(r"\s*\S+")

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


@dataclass
class RecordedRequest:
    """One request as the fake saw it, plus what it did with it."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    time: float
    query: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    """Status sent (200 for a stream even if its body was cut later), or None if nothing was sent."""
    usage: dict[str, int] | None = None
    """Tokens actually spent on a completion request (also for cut or cancelled streams)."""
    fault: str = "none"
    """The fault applied to this request ("none" when it was served normally)."""
    cancelled: bool = False
    """True when the client went away before the fake had finished answering."""
    finished: float | None = None

    @property
    def model(self) -> str | None:
        """The `model` named in the JSON body, if any."""
        if isinstance(self.json, dict):
            model = self.json.get("model")
            return model if isinstance(model, str) else None
        return None

    @property
    def stream(self) -> bool:
        """Whether the JSON body asked for a stream."""
        return isinstance(self.json, dict) and bool(self.json.get("stream"))


@dataclass
class _Knobs:
    fault: str
    ttft: float
    tok: float
    length: int
    fail_n: int | None


@dataclass
class _State:
    rec: RecordedRequest
    knobs: _Knobs
    # Set when the fake itself cuts the connection, so the cancellation that follows is not
    # mistaken for a client disconnect.
    dropped: bool = False
    response: web.StreamResponse | None = None  # once prepared (headers sent)


class _Gone(Exception):
    """The connection is closed; the handler has nothing left to send."""


@dataclass
class _Choice:
    tokens: list[str]
    finish_reason: str


class FakeUpstream:
    """A scriptable, fault-injecting fake of vLLM's OpenAI-compatible HTTP server.

    Use as `with FakeUpstream() as up:` (or `async with`), or call `start()` / `stop()`.
    Attributes meant to be set by tests: `answers`, `fault`, `fault_scope`, `ttft`, `tok`,
    `length`, `fail_n`, `verify_suffix`, `logprob_fn`, `adapters`, `slow_ttft`, `slow_tok`.
    """

    def __init__(self, *, port: int = 0, model: str = "fake", max_model_len: int = 4096) -> None:
        self.port = port
        self.model = model
        self.max_model_len = max_model_len
        self.answers: list[str] = ["42"]
        self.fault: str = "none"
        self.fault_scope: Literal["completions", "all"] = "completions"
        self.ttft = 0.0
        self.tok = 0.0
        self.length = 16
        self.fail_n = 0
        self.slow_ttft = 0.5
        self.slow_tok = 0.05
        self.verify_suffix: str | None = VERIFY_SUFFIX
        self.logprob_fn: LogprobFn | None = None
        self.adapters: dict[str, str] = {}
        """Loaded LoRA adapters: name -> path."""
        self.plain_stream_options = False
        """Refuse ``stream_options`` other than ``include_usage`` with a 400, as a non-vLLM server may."""
        self.requests: list[RecordedRequest] = []
        self.cancelled = 0
        """Completion requests abandoned by their client while the fake was still answering."""
        self.in_flight = 0
        """Completion requests currently being answered (includes hanging ones)."""
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._script: ScriptFn | None = None
        self._pushed: collections.deque[tuple[int, Any]] = collections.deque()
        self._fail_seen: collections.Counter[str] = collections.Counter()
        self._created = int(time.time())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API, e.g. "http://127.0.0.1:PORT/v1"."""
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        """The server's origin, without /v1 (where /health and /metrics live)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server is up."""
        return self._thread is not None

    def start(self) -> Self:
        """Start serving; binds a free port unless one was given (a restart keeps the port)."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,), name="fake-upstream", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._astart(), loop).result(timeout=10)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()
            raise
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Stop serving. Hanging and streaming requests are cut; recorded state is kept."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=15)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        # Starting and stopping block on the server thread; keep the caller's loop free meanwhile.
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _astart(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: aiohttp >= 3.9 no longer cancels a handler whose client went away
        # unless asked, and disconnect detection is the point of `cancelled`. A short shutdown
        # timeout keeps stop() quick even if a handler ignores the stop event.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(2048)
            sock.setblocking(False)
            site = web.SockSite(runner, sock, backlog=2048)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self.port = sock.getsockname()[1]
        self._runner = runner

    async def _astop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----------------------------------------------------------------------------- test API

    def script(self, fn: ScriptFn | None) -> Self:
        """Set fn(body, choice_index) -> content for every completion; None restores the default."""
        self._script = fn
        return self

    def push_response(self, status: int, json_body: Any) -> None:
        """Queue an exact response for the next completion request (FIFO, one each).

        A str or bytes body is sent verbatim; anything else as JSON.
        """
        self._pushed.append((status, json_body))

    def reset(self) -> None:
        """Back to a fresh fake's behaviour (script, knobs, adapters) with nothing recorded: a
        fake shared by a module's tests (``SHARED_SERVER``) starts every test like this."""
        self.script(None)
        self.clear()
        fresh = FakeUpstream()
        for knob in ("answers", "fault", "fault_scope", "ttft", "tok", "length", "fail_n", "slow_ttft", "slow_tok",
                     "verify_suffix", "logprob_fn", "plain_stream_options"):
            setattr(self, knob, getattr(fresh, knob))
        self.adapters.clear()

    def clear(self) -> None:
        """Forget recorded requests and counters (not adapters, script or knobs)."""
        self.requests.clear()
        self.cancelled = 0
        self._fail_seen.clear()
        self._pushed.clear()

    def completion_calls(self) -> list[RecordedRequest]:
        """Recorded POSTs to /v1/chat/completions and /v1/completions, in arrival order."""
        return [r for r in list(self.requests) if r.method == "POST" and r.path in COMPLETION_PATHS]

    def total_usage(self) -> dict[str, int]:
        """Sum of the usage the fake spent over all recorded requests."""
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for rec in list(self.requests):
            if rec.usage:
                for key in total:
                    total[key] += rec.usage.get(key, 0)
        return total

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll predicate (e.g. `lambda: up.in_flight == 0`) from sync code until true or timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    async def async_wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Like wait_until, but yields to the caller's event loop while polling."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def default_content(self, body: dict[str, Any], choice_index: int, length: int | None = None) -> str:
        """The content the fake gives when no script is set."""
        n_words = max((self.length if length is None else length) - 4, 0)
        words = " ".join(f"w{j}" for j in range(n_words))
        answers = self.answers or ["42"]
        out = f"{words} The answer is {answers[choice_index % len(answers)]}.".lstrip()
        if self.verify_suffix and _VERIFY_RE.search(_prompt_text(body)):
            out += self.verify_suffix
        return out

    # ----------------------------------------------------------------------------- dispatch

    def _knobs(self, headers: dict[str, str], completion: bool) -> _Knobs:
        applies = completion or self.fault_scope == "all"
        knobs = _Knobs(
            fault=self.fault if applies else "none", ttft=self.ttft, tok=self.tok, length=self.length,
            fail_n=None,
        )
        for part in headers.get("x-fake", "").split(","):
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep:
                continue
            with contextlib.suppress(ValueError):
                if key == "fault":
                    knobs.fault = value
                elif key == "ttft":
                    knobs.ttft = float(value)
                elif key == "tok":
                    knobs.tok = float(value)
                elif key == "len":
                    knobs.length = int(value)
                elif key == "fail_n":
                    knobs.fail_n = int(value)
        if knobs.fault == "slow":
            knobs.ttft = knobs.ttft or self.slow_ttft
            knobs.tok = knobs.tok or self.slow_tok
        return knobs

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        completion = request.method == "POST" and request.path in COMPLETION_PATHS
        rec = RecordedRequest(
            method=request.method, path=request.path, headers=headers, json=None, time=time.time(),
            query=dict(request.query),
        )
        self.requests.append(rec)
        state = _State(rec, self._knobs(headers, completion))
        if completion:
            self.in_flight += 1
        try:
            raw = await request.read()
            if raw:
                try:
                    rec.json = json.loads(raw)
                except ValueError:
                    rec.json = None
            resp = await self._route(request, state, completion)
            rec.status = resp.status
            return resp
        except asyncio.CancelledError:
            # Cancellation comes from aiohttp when the client disconnects, from our own drop (the
            # transport close loops back as connection_lost), or from shutdown.
            self._note_disconnect(state, completion)
            raise
        except (ConnectionResetError, _Gone):
            # A stream write found the client gone before aiohttp had cancelled us, or we dropped
            # the connection ourselves. Raising would make aiohttp log an error; handing it a
            # response whose write fails on the closed transport is its quiet path.
            self._note_disconnect(state, completion)
            return state.response or web.Response(status=499)
        finally:
            if completion:
                self.in_flight -= 1
            rec.finished = time.time()

    def _note_disconnect(self, state: _State, completion: bool) -> None:
        if state.dropped or state.rec.cancelled or (self._stopping is not None and self._stopping.is_set()):
            return
        state.rec.cancelled = True
        if completion:
            self.cancelled += 1

    async def _route(self, request: web.Request, state: _State, completion: bool) -> web.StreamResponse:
        if completion and self._pushed:
            status, body = self._pushed.popleft()
            state.rec.fault = "pushed"
            if isinstance(body, bytes | str):
                return web.Response(status=status, body=body, content_type="application/json")
            return web.json_response(body, status=status)
        fail = self._should_fail(state)
        if fail:
            state.rec.fault = "fail_n"
            return _error(500, "fake: scripted failure (fail_n)")
        faulted = await self._apply_fault(request, state)
        if faulted is not None:
            return faulted
        path, method = request.path, request.method
        if completion:
            return await self._completion(request, state, chat=path == CHAT_PATH)
        if method == "GET" and path in ("/health", "/ping"):
            return web.Response(status=200)
        if method == "GET" and path == "/v1/models":
            return web.json_response(self._models())
        if method == "GET" and path == "/metrics":
            return web.Response(text=self._metrics(), content_type="text/plain")
        if method == "POST" and path == "/v1/load_lora_adapter":
            return self._load_lora(state.rec.json)
        if method == "POST" and path == "/v1/unload_lora_adapter":
            return self._unload_lora(state.rec.json)
        if method == "POST" and path == "/v1/embeddings":
            return self._embeddings(state.rec.json)
        if path.startswith(ECHO_PREFIXES):
            return await self._echo(request, state)
        return _error(404, f"fake: no route for {method} {path}")

    def _embeddings(self, body: Any) -> web.Response:
        body = body if isinstance(body, dict) else {}
        inp = body.get("input")
        items = inp if isinstance(inp, list) else [inp]
        data = [{"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]} for i in range(len(items))]
        n = sum(len(str(x).split()) for x in items)
        return web.json_response({"object": "list", "data": data, "model": body.get("model", self.model),
                                  "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def _echo(self, request: web.Request, state: _State) -> web.StreamResponse:
        """Any other inference route (responses, tokenize, score, audio, ...): what arrived, as
        JSON; ``"stream": true`` gets it as three SSE events; ``/v1/audio/speech`` answers bytes."""
        rec = state.rec
        echo = {"object": "fake.echo", "method": request.method, "path": request.path, "query": rec.query,
                "body": rec.json, "content_type": rec.headers.get("content-type"),
                "authorization": rec.headers.get("authorization"), "usage": {"input_tokens": 3, "output_tokens": 4}}
        if request.path == "/v1/audio/speech":
            resp = web.StreamResponse(headers={"Content-Type": "audio/mpeg",
                                               "Content-Disposition": 'attachment; filename="speech.mp3"'})
            await resp.prepare(request)
            for k in range(3):
                await resp.write(bytes([k]) * 1024)
                await _sleep(state.knobs.tok)
            await resp.write_eof()
            return resp
        if isinstance(rec.json, dict) and rec.json.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Request-Id": "fake-req"})
            await resp.prepare(request)
            for k in range(3):
                await resp.write(f"event: fake.delta\ndata: {json.dumps({'k': k, 'path': request.path})}\n\n".encode())
                await _sleep(state.knobs.tok)
            done = {"type": "response.completed", "response": {"usage": echo["usage"]}}
            await resp.write(f"event: response.completed\ndata: {json.dumps(done)}\n\n".encode())
            await resp.write_eof()
            return resp
        return web.json_response(echo, headers={"X-Request-Id": "fake-req", "X-Internal": "not forwarded"})

    def _should_fail(self, state: _State) -> bool:
        knobs = state.knobs
        if knobs.fail_n is not None:
            key = state.rec.headers.get("x-fake", "")
            seen = self._fail_seen[key]
            self._fail_seen[key] = seen + 1
            return seen < knobs.fail_n
        if state.rec.path in COMPLETION_PATHS and self.fail_n > 0:
            self.fail_n -= 1
            return True
        return False

    async def _apply_fault(self, request: web.Request, state: _State) -> web.StreamResponse | None:
        fault = state.knobs.fault
        if fault in ("none", "", "slow", "drop_mid"):
            return None  # slow and drop_mid act during generation
        state.rec.fault = fault
        if fault == "drop":
            await self._drop(request, state)
        if fault == "hang":
            assert self._stopping is not None
            await self._stopping.wait()
            await self._drop(request, state)
        if fault == "garbage":
            if isinstance(state.rec.json, dict) and state.rec.json.get("stream"):
                return web.Response(body=b"data: {not json\n\n", content_type="text/event-stream")
            return web.Response(body=b"{not json", content_type="application/json")
        if fault.isdigit():
            return _error(int(fault), f"fake: injected fault {fault}")
        return _error(400, f"fake: unknown fault {fault!r}")

    async def _drop(self, request: web.Request, state: _State) -> None:
        """Close the connection without (finishing) an answer; never returns normally."""
        state.dropped = True
        transport = request.transport
        if transport is not None:
            transport.close()
        # connection_lost cancels this handler (handler_cancellation) within a loop iteration; the
        # wait on the stop event only guards against that never coming.
        assert self._stopping is not None
        await self._stopping.wait()
        raise _Gone

    # ----------------------------------------------------------------------------- endpoints

    def _models(self) -> dict[str, Any]:
        base = {
            "id": self.model, "object": "model", "created": self._created, "owned_by": "vllm",
            "root": self.model, "parent": None, "max_model_len": self.max_model_len,
        }
        data = [base] + [
            {
                "id": name, "object": "model", "created": self._created, "owned_by": "vllm",
                "root": path, "parent": self.model, "max_model_len": self.max_model_len,
            }
            for name, path in list(self.adapters.items())
        ]
        return {"object": "list", "data": data}

    def _metrics(self) -> str:
        label = f'{{model_name="{self.model}"}}'
        # Floats, as prometheus_client (and so vLLM) prints them.
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {float(self.in_flight)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} 0.0\n"
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
            "# TYPE vllm:prompt_tokens_total counter\n"
            f"vllm:prompt_tokens_total{label} {float(self.prompt_tokens_total)}\n"
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            f"vllm:generation_tokens_total{label} {float(self.generation_tokens_total)}\n"
        )

    def _load_lora(self, body: Any) -> web.Response:
        body = body if isinstance(body, dict) else {}
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.adapters and not body.get("load_inplace"):
            return _error(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                "in place, set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        self.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    def _unload_lora(self, body: Any) -> web.Response:
        body = body if isinstance(body, dict) else {}
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            return _error(
                400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput"
            )
        if name not in self.adapters:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # ----------------------------------------------------------------------------- completions

    def _choices(self, body: dict[str, Any], state: _State, chat: bool) -> list[_Choice]:
        n = body.get("n")
        n = 1 if n is None else n
        prompt = body.get("prompt")
        # vLLM answers a batch of prompts with n choices per prompt, indexed prompt-major.
        n_prompts = len(prompt) if not chat and isinstance(prompt, list) and _is_prompt_batch(prompt) else 1
        cap = body.get("max_completion_tokens") if chat else None
        cap = body.get("max_tokens") if cap is None else cap
        choices = []
        for i in range(n * n_prompts):
            if self._script is not None:
                content = self._script(body, i)
            else:
                content = self.default_content(body, i, state.knobs.length)
            tokens = _TOKEN_RE.findall(content)
            finish = "stop"
            if isinstance(cap, int) and len(tokens) > cap:
                tokens, finish = tokens[: max(cap, 0)], "length"
            choices.append(_Choice(tokens, finish))
        return choices

    async def _completion(self, request: web.Request, state: _State, chat: bool) -> web.StreamResponse:
        body = state.rec.json
        if not isinstance(body, dict):
            return _error(400, "fake: request body is not a JSON object")
        model = body.get("model", self.model)
        if model != self.model and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        n = body.get("n")
        if n is not None and (not isinstance(n, int) or n < 1):
            return _error(400, f"n must be at least 1, got {n}.")
        if chat and not isinstance(body.get("messages"), list):
            return _error(400, "fake: 'messages' must be a list")
        if not chat and body.get("prompt") is None:
            return _error(400, "fake: 'prompt' is required")
        options = body.get("stream_options")
        if self.plain_stream_options and isinstance(options, dict) and set(options) - {"include_usage"}:
            return _error(400, f"Unrecognized request argument supplied: stream_options {sorted(options)}")
        choices = self._choices(body, state, chat)
        prompt_tokens = _count_prompt_tokens(body)
        self.prompt_tokens_total += prompt_tokens
        gen = _Generation(self, body, state, chat, choices, prompt_tokens, str(model))
        if body.get("stream"):
            return await gen.stream(request)
        return await gen.respond(request)


class _Generation:
    """One completion being produced; keeps usage on the record current as tokens go out."""

    def __init__(
        self, fake: FakeUpstream, body: dict[str, Any], state: _State, chat: bool,
        choices: list[_Choice], prompt_tokens: int, model: str,
    ) -> None:
        self.fake, self.body, self.state, self.chat = fake, body, state, chat
        self.choices, self.prompt_tokens, self.model = choices, prompt_tokens, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.produced = [0] * len(choices)
        self._set_usage()
        lp = body.get("logprobs")
        if chat:
            self.want_logprobs = bool(lp)
            top = body.get("top_logprobs")
            self.top = top if isinstance(top, int) else 0
        else:
            self.want_logprobs = isinstance(lp, int) and not isinstance(lp, bool)
            self.top = lp if isinstance(lp, int) else 0

    def _set_usage(self) -> None:
        done = sum(self.produced)
        self.state.rec.usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def _produce(self, index: int, count: int) -> None:
        self.produced[index] += count
        self.fake.generation_tokens_total += count
        self._set_usage()

    def _usage(self) -> dict[str, int]:
        assert self.state.rec.usage is not None
        return dict(self.state.rec.usage)

    # Logprobs: the sampled token is always the most likely; alternatives trail it.

    def _logprob(self, index: int, j: int, token: str) -> float:
        if self.fake.logprob_fn is not None:
            return self.fake.logprob_fn(self.body, index, j, token)
        return -round(0.01 + ((index * 31 + j * 17) % 13) * 0.03, 4)

    def _tops(self, index: int, j: int, token: str) -> list[tuple[str, float]]:
        lp = self._logprob(index, j, token)
        alts = [(f" alt{k}", round(lp - 1.0 - 0.5 * k, 4)) for k in range(max(self.top - 1, 0))]
        return [(token, lp), *alts]

    def _chat_logprob_entry(self, index: int, j: int, token: str) -> dict[str, Any]:
        tops = self._tops(index, j, token)
        return {
            "token": token,
            "logprob": tops[0][1],
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in tops[: self.top]
            ],
        }

    def _chat_logprobs(self, index: int, start: int, tokens: list[str]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {"content": [self._chat_logprob_entry(index, start + k, t) for k, t in enumerate(tokens)]}

    def _completion_logprobs(
        self, index: int, start: int, tokens: list[str], offset: int
    ) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        out: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for k, token in enumerate(tokens):
            tops = self._tops(index, start + k, token)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(tops[0][1])
            out["tokens"].append(token)
            out["top_logprobs"].append(dict(tops))
            offset += len(token)
        return out

    def _choice_json(self, index: int) -> dict[str, Any]:
        choice = self.choices[index]
        text = "".join(choice.tokens)
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": self._chat_logprobs(index, 0, choice.tokens),
                "finish_reason": choice.finish_reason,
                "stop_reason": None,
            }
        return {
            "index": index,
            "text": text,
            "logprobs": self._completion_logprobs(index, 0, choice.tokens, 0),
            "finish_reason": choice.finish_reason,
            "stop_reason": None,
        }

    async def respond(self, request: web.Request) -> web.StreamResponse:
        knobs = self.state.knobs
        steps = max((len(c.tokens) for c in self.choices), default=0)
        await _sleep(knobs.ttft + knobs.tok * max(steps - 1, 0))
        for i, choice in enumerate(self.choices):
            self._produce(i, len(choice.tokens))
        payload = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._choice_json(i) for i in range(len(self.choices))],
            "usage": self._usage(),
        }
        data = json.dumps(payload).encode()
        if knobs.fault != "drop_mid":
            return web.Response(body=data, content_type="application/json")
        # Promise the whole body, deliver half, hang up.
        self.state.rec.fault = "drop_mid"
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(data)
        await resp.prepare(request)
        self.state.response = resp
        self.state.rec.status = resp.status
        await resp.write(data[: len(data) // 2])
        await self.fake._drop(request, self.state)
        return resp  # unreachable: _drop always raises

    def _chunk(self, choice: dict[str, Any], tokens_so_far: int | None = None) -> bytes:
        event: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        options = self.body.get("stream_options")
        if tokens_so_far is not None and isinstance(options, dict) and options.get("continuous_usage_stats"):
            # as vLLM: every chunk carries its choice's completion tokens so far
            event["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens_so_far,
                              "total_tokens": self.prompt_tokens + tokens_so_far}
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    def _token_chunk(self, index: int, j: int, offset: int) -> bytes:
        choice = self.choices[index]
        token = choice.tokens[j] if j < len(choice.tokens) else ""
        tokens = [token] if token else []
        finish = choice.finish_reason if j >= len(choice.tokens) - 1 else None
        if self.chat:
            return self._chunk({
                "index": index,
                "delta": {"content": token},
                "logprobs": self._chat_logprobs(index, j, tokens),
                "finish_reason": finish,
            }, self.produced[index] + len(tokens))
        return self._chunk({
            "index": index,
            "text": token,
            "logprobs": self._completion_logprobs(index, j, tokens, offset),
            "finish_reason": finish,
        })

    async def stream(self, request: web.Request) -> web.StreamResponse:
        knobs = self.state.knobs
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.state.response = resp
        self.state.rec.status = resp.status  # sent, whatever happens to the body
        await _sleep(knobs.ttft)
        if self.chat:
            # vLLM opens each choice with a role-only delta.
            await resp.write(b"".join(
                self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
                for i in range(len(self.choices))
            ))
        # A choice with nothing to say still has to report why it finished.
        empties = [i for i, c in enumerate(self.choices) if not c.tokens]
        if empties:
            await resp.write(b"".join(self._token_chunk(i, 0, 0) for i in empties))
        steps = max((len(c.tokens) for c in self.choices), default=0)
        offsets = [0] * len(self.choices)
        for step in range(steps):
            if step:
                await _sleep(knobs.tok)
            if knobs.fault == "drop_mid" and step == steps // 2:
                self.state.rec.fault = "drop_mid"
                await self.fake._drop(request, self.state)
            out = []
            for i, choice in enumerate(self.choices):
                if step < len(choice.tokens):
                    out.append(self._token_chunk(i, step, offsets[i]))
                    offsets[i] += len(choice.tokens[step])
            # Count before writing: the tokens were generated (spent) even if the client is gone.
            for i, choice in enumerate(self.choices):
                if step < len(choice.tokens):
                    self._produce(i, 1)
            await resp.write(b"".join(out))
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await resp.write(self._chunk_usage())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _chunk_usage(self) -> bytes:
        event: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self._usage(),
        }
        return b"data: " + json.dumps(event).encode() + b"\n\n"


# --------------------------------------------------------------------------------- helpers


def _error(status: int, message: str, err_type: str | None = None) -> web.Response:
    """An error in vLLM's (OpenAI's) shape."""
    fallback = "InternalServerError" if status >= 500 else "BadRequestError"
    err_type = err_type or _ERROR_TYPES.get(status, fallback)
    body = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    return web.json_response(body, status=status)


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def _is_prompt_batch(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str | list) for p in prompt)


def _texts(body: dict[str, Any]) -> Iterator[str]:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part["text"]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list):
        for p in prompt:
            if isinstance(p, str):
                yield p


def _prompt_text(body: dict[str, Any]) -> str:
    return "\n".join(_texts(body))


def _count_prompt_tokens(body: dict[str, Any]) -> int:
    """Words in the prompt or message contents, plus any pre-tokenised ids; at least 1."""
    count = sum(len(t.split()) for t in _texts(body))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        for p in prompt:
            if isinstance(p, int):
                count += 1
            elif isinstance(p, list):
                count += sum(1 for x in p if isinstance(x, int))
    return max(count, 1)


def main() -> None:
    """Runs the fake standalone (for loadtest/): ``python -m tests.fakes.upstream --port P``."""
    import argparse

    ap = argparse.ArgumentParser(description="scripted OpenAI-compatible fake upstream")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ttft", type=float, default=0.0)
    ap.add_argument("--tok", type=float, default=0.0)
    ap.add_argument("--len", type=int, default=16)
    a = ap.parse_args()
    up = FakeUpstream(port=a.port)
    up.ttft, up.tok, up.length = a.ttft, a.tok, a.len
    with up:
        print(up.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
