"""The FastAPI app: wiring, lifespan, and the one handler that turns errors into responses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from protocol.errors import InvalidRequest, NotFound, SharpenError
from server import heap
from server.admin import router as admin_router
from server.limits import BodyLimit
from server.pool import UpstreamPool
from server.redact import clip
from server.replica import unique_urls
from server.responses import error_response
from server.routes import router
from server.services import Services
from server.settings import Settings
from server.streaming import ClientGone
from server.ui import router as ui_router
from server.upstream import Upstream

log = logging.getLogger(__name__)


class Backend(Protocol):
    """A managed upstream (the embedded vLLM child): started and stopped with the app."""

    @property
    def base_url(self) -> str: ...
    async def start(self) -> None: ...
    async def wait_ready(self, timeout: float) -> None: ...
    async def stop(self) -> None: ...


_HOT_ROUTES = {"/v1/chat/completions": "/chat/completions", "/v1/completions": "/completions"}


class HotPath:
    """The completion routes as a lean ASGI layer in front of the FastAPI app.

    Measured on a 2-core machine (loadtest/overhead.py), FastAPI's routing, dependency solving
    and Starlette's middleware stack (which also wraps every streamed chunk's ``send``) cost
    about as much CPU per request as the rest of the proxy together. The two hot routes are
    dispatched here to the same service and error handler; every other route is FastAPI's.
    """

    def __init__(self, app: FastAPI, services: Services) -> None:
        self.app = app
        self.services = services
        settings = services.settings
        self.limit = BodyLimit(settings.max_body_bytes, settings.body_timeout_s)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.limit.declared_over(scope):  # refused before a byte of the body is read
            await error_response(self.limit.too_large())(scope, receive, send)
            return
        endpoint = _HOT_ROUTES.get(scope.get("path", ""))
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, self.limit.wrap(receive), send)
            return
        receive = self.limit.wrap(receive, count=False)  # the proxy counts (and drains) its body itself
        request = Request(scope, receive)
        response: Response
        try:
            principal = self.services.authenticate(request)
            response = await self.services.proxy.handle(endpoint, request, principal)
        except ClientGone:
            return
        except Exception as exc:
            response = error_response(exc, where=f"POST {scope['path']}")
        await response(scope, receive, send)


def create_app(settings: Settings, *, upstream: Upstream | None = None, backend: Backend | None = None) -> HotPath:
    """Builds the app. ``upstream`` is injectable (tests); by default it is made from the settings'
    URL, or from ``backend`` (a managed vLLM child started in the lifespan)."""
    if upstream is None:
        urls = [backend.base_url] if backend is not None else unique_urls(settings.upstream.endpoints)
        if not urls:
            raise ValueError("an upstream URL or a managed backend is required")
        # one URL: the plain client, so the hot path pays nothing for balancing
        pool = UpstreamPool if len(urls) > 1 else None
        upstream = pool(urls, settings.upstream) if pool else Upstream(urls[0], settings.upstream)
    services = Services(settings, upstream)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        waiter: asyncio.Task[None] | None = None
        await services.start()
        if backend is not None:
            await backend.start()

            async def _when_ready() -> None:
                try:
                    await backend.wait_ready(settings.backend.start_timeout)
                except Exception as exc:
                    log.error("the embedded backend did not become ready: %s", exc)
                    return
                log.info("upstream ready at %s", backend.base_url)
                await services.upstream_up()

            waiter = asyncio.create_task(_when_ready())
        else:
            await services.upstream_up()
        heap.settle(freeze=settings.gc_freeze, thresholds=settings.gc_thresholds)
        try:
            yield
        finally:
            heap.release()
            if waiter is not None:
                waiter.cancel()
            await services.close()
            if backend is not None:
                await backend.stop()

    app = FastAPI(title="sharpen", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.services = services
    app.include_router(router)
    app.include_router(admin_router)
    if settings.ui.enabled:
        app.include_router(ui_router)

    @app.exception_handler(SharpenError)
    async def _sharpen_error(request: Request, exc: SharpenError) -> Response:
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err: SharpenError
        if exc.status_code == 404:
            err = NotFound(f"Unknown route {request.method} {clip(request.url.path, 200)}.")
        else:
            err = InvalidRequest(str(exc.detail))
        resp = error_response(err)
        resp.status_code = exc.status_code
        if exc.headers:
            resp.headers.update(exc.headers)  # e.g. the Allow header a 405 must carry
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid_params(request: Request, exc: RequestValidationError) -> Response:
        """FastAPI's own validation (query and path parameters) in the OpenAI shape, not its 422."""
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ())]
        param = ".".join(loc[1:] if loc and loc[0] in ("query", "path", "body", "header") else loc) or None
        return error_response(InvalidRequest(f"Invalid value for '{param}': {first.get('msg', 'invalid')}.",
                                             param=param))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(exc, where=f"{request.method} {request.url.path}")

    return HotPath(app, services)
