"""Admin routes (admin key): the experience memory, adapters and adaptation jobs."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response, StreamingResponse

from protocol.errors import InvalidRequest, NotFound, ServiceUnavailable
from protocol.wire import parse_json, validate
from server.redact import clip
from server.services import Services

if TYPE_CHECKING:
    from adapt.data import Example
    from adapt.service import AdaptationService
    from memory.store import Experience

router = APIRouter(prefix="/admin")

_MAX_OFFSET = 2**62  # SQLite's OFFSET is a signed 64-bit integer: past it, a 400 and not an overflow
_FIELDS = {"tenant", "task", "answer", "score", "kind", "insights", "workflow", "source"}


def _memory(request: Request, *, stats: bool = False) -> Services:
    s: Services = request.app.state.services
    s.auth.require_admin(request.headers.get("authorization"))
    if s.role == "replica":
        raise ServiceUnavailable(s.not_primary, code="not_primary")
    if s.memory is None:
        raise ServiceUnavailable("Memory is not enabled on this server.", code="memory_disabled")
    if s.memory.failure is not None and not stats:  # fail fast: the store will never be ready
        raise ServiceUnavailable(f"Memory is unavailable: {s.memory.failure}.", code="memory_unavailable")
    return s


@contextlib.contextmanager
def _storage_faults() -> Iterator[None]:
    """A database fault is a 503 that says so, never a 500."""
    from memory.integrity import MemoryUnavailable

    try:
        yield
    except (MemoryUnavailable, sqlite3.Error) as exc:
        raise ServiceUnavailable(f"Memory is unavailable: {exc}.", code="memory_unavailable") from None


async def _run(s: Services, fn: Any, *args: Any) -> Any:
    """A store operation in the memory's write thread."""
    assert s.memory is not None
    with _storage_faults():
        return await s.memory.run(fn, *args)


@router.get("/memory/stats")
async def memory_stats(request: Request) -> dict[str, Any]:
    s = _memory(request, stats=True)
    assert s.memory is not None
    if not s.memory.ready:  # still opening, or failed to: say so instead of waiting
        return s.memory.stats()
    stats: dict[str, Any] = await _run(s, s.memory.stats)
    return stats


@router.get("/memory")
async def memory_list(request: Request, tenant: str | None = None, q: str | None = None, limit: int = 50,
                      offset: int = Query(0, le=_MAX_OFFSET)) -> dict[str, Any]:
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
    rows = await _run(s, s.memory.store.list, tenant, limit, max(offset, 0))
    return {"object": "list", "data": [r.public() for r in rows]}


@router.delete("/memory/{uid}")
async def memory_delete(request: Request, uid: str) -> dict[str, Any]:
    s = _memory(request)
    assert s.memory is not None
    if not await _run(s, s.memory.delete_ids, [uid]):
        raise NotFound(f"No experience with id '{clip(uid)}'.", param="id")
    return {"id": uid, "deleted": True}


@router.delete("/memory")
async def memory_delete_tenant(request: Request, tenant: str) -> dict[str, Any]:
    s = _memory(request)
    assert s.memory is not None
    n = await _run(s, s.memory.delete_tenant, tenant)
    return {"tenant": tenant, "deleted": n}


@router.get("/memory/export")
async def memory_export(request: Request, tenant: str | None = None) -> Response:
    """Every experience (of ``tenant``, or all) as JSONL; import takes the same lines back."""
    s = _memory(request)
    assert s.memory is not None and s.memory.store is not None
    store = s.memory.store
    rows: list[Experience] = await _run(s, lambda: list(store.iter_all(tenant)))

    async def lines() -> AsyncIterator[bytes]:
        for r in rows:
            yield orjson.dumps(r.public()) + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/memory/import")
async def memory_import(request: Request) -> dict[str, Any]:
    """JSONL of experiences (``tenant``, ``task``, ``answer``, ``score`` at least); returns once
    every line is committed, all of them or none. A bad line rejects the whole import, naming its
    line number; exact duplicates are skipped and reported (``duplicate_lines``)."""
    from memory.importer import ImportRejected
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
            exp.score = float(exp.score)  # a string score would break the merge's comparison later
            if not all(isinstance(getattr(exp, f), str) for f in _FIELDS - {"score"}):
                raise ValueError("text fields must be strings")
            if not (exp.tenant and exp.task and exp.answer) or not 0 <= exp.score <= 1:
                raise ValueError("tenant, task, answer and a score in [0, 1] are required")
            if exp.kind not in ("success", "pitfall"):
                raise ValueError("kind must be 'success' or 'pitfall'")
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidRequest(f"line {n}: {exc}", param=f"line {n}") from None
        exp.source = exp.source or "import"
        exps.append(exp)
    try:
        with _storage_faults():
            report = await s.memory.import_experiences(exps)
    except ImportRejected as exc:
        raise InvalidRequest(str(exc), param="tenant") from None
    return {"imported": report.inserted + report.merged, "inserted": report.inserted, "merged": report.merged,
            "duplicates": len(report.duplicates), "duplicate_lines": report.duplicates[:100]}


# -- adaptation -----------------------------------------------------------------------------------


class _Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class CycleRequest(BaseModel):
    """Starts a cycle for ``tenant``. Optional ``examples`` (train on these instead of the
    synthesized ones) and ``heldout`` (gate on these; their final answers are the references)."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = "default"
    examples: list[_Example] | None = None
    heldout: list[_Example] | None = None


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = "default"


def _adapt(request: Request) -> AdaptationService:
    s: Services = request.app.state.services
    s.auth.require_admin(request.headers.get("authorization"))
    if s.adapt is None:
        raise ServiceUnavailable("Adaptation is not enabled on this server (adapt.enabled).",
                                 code="adaptation_disabled")
    return s.adapt


async def _json_body(request: Request) -> Any:
    """The JSON body (``{}`` when empty); malformed JSON is a 400, not an internal error."""
    return parse_json(await request.body() or b"{}")


def _examples(items: list[_Example] | None) -> list[Example] | None:
    if items is None:
        return None
    from adapt.data import Example
    from strategies.answers import extract

    return [Example(task=e.task, answer=e.answer, reference=extract(e.answer)) for e in items]


@router.post("/adaptation/run")
async def adaptation_run(request: Request) -> dict[str, Any]:
    a = _adapt(request)
    body = validate(CycleRequest, await _json_body(request))
    job = a.run_cycle(body.tenant, examples=_examples(body.examples), heldout=_examples(body.heldout))
    return {"object": "adaptation.job", "id": job.id, "status": job.status}


@router.get("/adaptation/jobs/{job_id}")
async def adaptation_job(request: Request, job_id: str) -> dict[str, Any]:
    a = _adapt(request)
    job = a.jobs.get(job_id)
    if job is None:
        raise NotFound(f"No adaptation job '{clip(job_id)}'.", param="id")
    return {"object": "adaptation.job", **a.progress(job)}


@router.post("/adaptation/jobs/{job_id}/cancel")
async def adaptation_cancel(request: Request, job_id: str) -> dict[str, Any]:
    a = _adapt(request)
    if a.jobs.get(job_id) is None:
        raise NotFound(f"No adaptation job '{clip(job_id)}'.", param="id")
    await a.cancel(job_id)
    return {"id": job_id, "cancelling": True}


@router.get("/adaptation")
async def adaptation_status(request: Request) -> dict[str, Any]:
    return _adapt(request).status()


@router.get("/adapters")
async def adapters(request: Request, tenant: str | None = None) -> dict[str, Any]:
    a = _adapt(request)
    return {"object": "list", "data": [{**v.__dict__, "in_flight": a.registry.in_flight(v.name)}
                                       for v in a.registry.versions(tenant)]}


@router.post("/adapters/rollback")
async def adapters_rollback(request: Request) -> dict[str, Any]:
    a = _adapt(request)
    body = validate(RollbackRequest, await _json_body(request))
    return await a.rollback(body.tenant)
