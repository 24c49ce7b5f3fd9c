"""HTTP routes: thin, the work is in the services."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from server.services import Services

router = APIRouter()


def _services(request: Request) -> Services:
    s: Services = request.app.state.services
    return s


@router.get("/health", include_in_schema=False)
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/ready")
async def ready(request: Request) -> Response:
    s = _services(request)
    s.authenticate(request)
    ok = await s.upstream_ready()
    body = {"status": "ready" if ok else "waiting for upstream", "upstream": s.upstream.base_url}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    s = _services(request)
    s.authenticate(request)
    return Response(s.metrics.render(), media_type=s.metrics.content_type)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    s = _services(request)
    s.authenticate(request)
    await s.models.refresh()
    return {"object": "list", "data": s.model_cards()}


@router.post("/v1/chat/completions", response_model=None)  # served by app.HotPath; kept for the schema
async def chat_completions(request: Request) -> Response:
    s = _services(request)
    return await s.proxy.handle("/chat/completions", request, s.authenticate(request))


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Response:
    s = _services(request)
    return await s.proxy.handle("/completions", request, s.authenticate(request))
