"""Admin routes (admin key): the experience memory. Later: adapters and adaptation jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from server.errors import InvalidRequest, NotFound, ServiceUnavailable
from server.services import Services

if TYPE_CHECKING:
    from memory.store import Experience

router = APIRouter(prefix="/admin")

_FIELDS = {"tenant", "task", "answer", "score", "kind", "insights", "workflow", "source"}


def _memory(request: Request) -> Services:
    s: Services = request.app.state.services
    s.auth.require_admin(request.headers.get("authorization"))
    if s.memory is None:
        raise ServiceUnavailable("Memory is not enabled on this server.", code="memory_disabled")
    return s


@router.get("/memory/stats")
async def memory_stats(request: Request) -> dict[str, Any]:
    s = _memory(request)
    assert s.memory is not None
    stats: dict[str, Any] = await s.memory.run(s.memory.stats)
    return stats


@router.get("/memory")
async def memory_list(request: Request, tenant: str | None = None, q: str | None = None, limit: int = 50,
                      offset: int = 0) -> dict[str, Any]:
    """Lists a tenant's (or everyone's) experiences, newest first; with ``q``, searches a tenant's."""
    s = _memory(request)
    assert s.memory is not None
    limit = max(1, min(limit, 1000))
    if q is not None:
        if tenant is None:
            raise InvalidRequest("Searching needs a 'tenant'.", param="tenant")
        hits = await s.memory.recall(tenant, q, k=limit, threshold=-1.0)
        return {"object": "list", "data": [{**h.experience.public(), "similarity": round(h.similarity, 4)}
                                           for h in hits]}
    assert s.memory.store is not None
    rows = await s.memory.run(s.memory.store.list, tenant, limit, max(offset, 0))
    return {"object": "list", "data": [r.public() for r in rows]}


@router.delete("/memory/{uid}")
async def memory_delete(request: Request, uid: str) -> dict[str, Any]:
    s = _memory(request)
    assert s.memory is not None
    if not await s.memory.run(s.memory.delete_ids, [uid]):
        raise NotFound(f"No experience with id '{uid}'.", param="id")
    return {"id": uid, "deleted": True}


@router.delete("/memory")
async def memory_delete_tenant(request: Request, tenant: str) -> dict[str, Any]:
    s = _memory(request)
    assert s.memory is not None
    n = await s.memory.run(s.memory.delete_tenant, tenant)
    return {"tenant": tenant, "deleted": n}


@router.get("/memory/export")
async def memory_export(request: Request, tenant: str | None = None) -> Response:
    """Every experience (of ``tenant``, or all) as JSONL; import takes the same lines back."""
    s = _memory(request)
    assert s.memory is not None and s.memory.store is not None
    store = s.memory.store
    rows: list[Experience] = await s.memory.run(lambda: list(store.iter_all(tenant)))

    async def lines() -> AsyncIterator[bytes]:
        for r in rows:
            yield orjson.dumps(r.public()) + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/memory/import")
async def memory_import(request: Request) -> dict[str, Any]:
    """JSONL of experiences (``tenant``, ``task``, ``answer``, ``score`` at least); returns once
    every line is committed. A bad line rejects the whole import, naming its line number."""
    from memory.store import Experience

    s = _memory(request)
    assert s.memory is not None
    exps = []
    for n, line in enumerate((await request.body()).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = orjson.loads(line)
            fields = {k: v for k, v in d.items() if k in _FIELDS}
            exp = Experience(**fields)
            if not (exp.tenant and exp.task and exp.answer) or not 0 <= float(exp.score) <= 1:
                raise ValueError("tenant, task, answer and a score in [0, 1] are required")
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidRequest(f"line {n}: {exc}", param=f"line {n}") from None
        exp.source = exp.source or "import"
        exps.append(exp)
    futs = [s.memory.remember(e) for e in exps]
    stored = [await f for f in futs]
    return {"imported": sum(1 for r in stored if r is not None), "dropped": sum(1 for r in stored if r is None)}
