"""The one place an error becomes what the client gets: an HTTP response (the hot path, the
FastAPI handlers) or, once a stream has begun, an in-band SSE ``error`` event."""

from __future__ import annotations

import logging

import orjson
from starlette.responses import Response

from protocol.errors import InternalError, SharpenError, as_sharpen_error, status_of

log = logging.getLogger(__name__)


def _describe(exc: BaseException, where: str) -> SharpenError:
    err = as_sharpen_error(exc)
    if isinstance(err, InternalError) and err is not exc:
        log.error("unexpected error on %s", where, exc_info=exc)
    return err


def error_response(exc: BaseException, *, where: str = "a request") -> Response:
    """Any exception as an OpenAI-shaped error response (ours with their status and headers;
    anything else a 500 whose details go to the log only)."""
    err = _describe(exc, where)
    return Response(err.body_bytes(), status_code=status_of(err), media_type="application/json",
                    headers=err.headers())


def error_event(exc: BaseException, *, where: str = "a stream") -> bytes:
    """Any exception as an SSE ``error`` event, for a stream whose status line is already sent."""
    return b"event: error\ndata: " + orjson.dumps(_describe(exc, where).body()) + b"\n\n"
