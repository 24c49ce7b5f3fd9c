"""HTTP routes: thin, the work is in the services."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from protocol.errors import InvalidRequest, ServiceUnavailable
from protocol.wire import parse_json, validate
from server.forward import FORWARD_METHODS, TOP_LEVEL
from server.services import Services

router = APIRouter()


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    score: float = Field(ge=0, le=1)


def _services(request: Request) -> Services:
    s: Services = request.app.state.services
    return s


@router.get("/health", include_in_schema=False)
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/ready")
async def ready(request: Request) -> Response:
    s = _services(request)
    who = s.authenticate(request)
    ok, body = await s.readiness(admin=who.admin)
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    s = _services(request)
    principal = s.authenticate(request)
    return Response(s.metrics.render(admin=principal.admin), media_type=s.metrics.content_type)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    s = _services(request)
    principal = s.authenticate(request)
    await s.models.refresh()
    return {"object": "list", "data": s.model_cards(principal.tenant)}


@router.post("/v1/chat/completions", response_model=None)  # served by app.HotPath; kept for the schema
async def chat_completions(request: Request) -> Response:
    s = _services(request)
    return await s.proxy.handle("/chat/completions", request, s.authenticate(request))


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Response:
    s = _services(request)
    return await s.proxy.handle("/completions", request, s.authenticate(request))


@router.post("/v1/feedback")
async def feedback(request: Request) -> dict[str, Any]:
    """Scores a recent answer: ``{"id": <response id>, "score": 0..1}``; stored as an experience."""
    s = _services(request)
    principal = s.authenticate(request)
    if s.role == "replica":
        raise ServiceUnavailable(s.not_primary, code="not_primary")
    if s.recorder is None:
        raise InvalidRequest("Memory is not enabled on this server.", param="memory")
    fb = validate(Feedback, await _json(request))
    row = await s.recorder.feedback(principal.tenant, fb.id, fb.score)
    return {"object": "feedback", "id": fb.id, "stored": True, "experience_id": row.uid, "kind": row.kind}


async def _json(request: Request) -> Any:
    return parse_json(await request.body())


async def forward(request: Request) -> Response:
    """Everything else the upstream serves (see server/forward.py); registered last."""
    s = _services(request)
    return await s.forwarder.handle(request, s.authenticate(request))


for _path in sorted(TOP_LEVEL):
    router.add_api_route(_path, forward, methods=FORWARD_METHODS, include_in_schema=False)
router.add_api_route("/v1/{rest:path}", forward, methods=FORWARD_METHODS, include_in_schema=False)
