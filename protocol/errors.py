"""The one error hierarchy. Foreign exceptions are translated into these at the boundary that
meets them (the upstream transport, request parsing); ``server.responses.error_response`` turns
any of them into an OpenAI-shaped response: ``{"error": {"message", "type", "param", "code"}}``.

    SharpenError (500 server_error)
    ├── InternalError (500, code internal_error: a bug, details only in the server log)
    ├── InvalidRequest (400 invalid_request_error)
    │   ├── CanaryInvalid (code adaptation_canary_invalid: adapt.canary unreadable or unusable)
    │   └── LabellingFailed (422, code adaptation_unlabelled: no usable consensus label)
    ├── AuthenticationFailed (401)
    ├── RequestTimeout (408: the request body did not arrive in time)
    ├── PermissionDenied (403)
    ├── NotFound (404)
    │   └── ModelNotFound
    ├── PayloadTooLarge (413)
    ├── RateLimited (429, Retry-After)
    ├── ServiceUnavailable (503)
    ├── UpstreamError (502: unreachable or unreadable upstream)
    │   ├── UpstreamConnectError (nothing came back: safe to retry)
    │   └── UpstreamTimeout (504)
    └── UpstreamStatusError (the upstream's own 4xx/5xx, passed on)
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class SharpenError(Exception):
    """Base of every error sharpen reports to a client. Subclasses fix status, type and code."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def headers(self) -> dict[str, str]:
        return {}


class InternalError(SharpenError):
    """An unexpected exception: the client learns only that sharpen failed."""

    default_code = "internal_error"

    def __init__(self, message: str = "Internal error in sharpen; see the server log.") -> None:
        super().__init__(message)


class InvalidRequest(SharpenError):
    status = 400
    type = "invalid_request_error"


class CanaryInvalid(InvalidRequest):
    """The adaptation canary file (``adapt.canary``) is missing, malformed, or holds no usable answer."""

    default_code = "adaptation_canary_invalid"


class LabellingFailed(InvalidRequest):
    """An adaptation cycle got no usable labels: every labelling call failed, or no question had
    a clear majority."""

    status = 422
    default_code = "adaptation_unlabelled"


class AuthenticationFailed(SharpenError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, *, challenge: str = "Bearer") -> None:
        super().__init__(message)
        self.challenge = challenge  # the WWW-Authenticate scheme the client is invited to use

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.challenge}


class PermissionDenied(SharpenError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class NotFound(SharpenError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class PayloadTooLarge(SharpenError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RequestTimeout(SharpenError):
    """The client did not send its request body in time."""

    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class RateLimited(SharpenError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ServiceUnavailable(SharpenError):
    status = 503
    type = "service_unavailable"
    default_code = "upstream_not_ready"


class UpstreamError(SharpenError):
    """The upstream could not be reached, or its answer could not be read."""

    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"


class UpstreamConnectError(UpstreamError):
    """Nothing usable came back: the connection failed or was dropped before the headers.
    Safe to retry, since nothing has reached the client yet."""


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"
    default_code = "upstream_timeout"


class UpstreamStatusError(SharpenError):
    """The upstream answered with an error status; its message is passed on, normalised to the
    OpenAI shape (vLLM puts the integer status in ``code``; OpenAI's ``code`` is a string)."""

    type = "upstream_error"

    def __init__(self, status: int, message: str, *, err_type: str | None, param: str | None,
                 code: str | None) -> None:
        super().__init__(message, param=param, code=code)
        self._status = status
        self._type = err_type or ("invalid_request_error" if status < 500 else "upstream_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self._type, "param": self.param, "code": self.code}}

    @property
    def http_status(self) -> int:
        return self._status

    @classmethod
    def from_upstream(cls, status: int, raw: bytes) -> UpstreamStatusError:
        """Normalises an upstream error body, whatever its shape."""
        message, err_type, param, code = "", None, None, None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        err = data.get("error", data) if isinstance(data, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or "")
            err_type = _str_or_none(err.get("type"))
            param = _str_or_none(err.get("param"))
            code = _str_or_none(err.get("code"))
        elif isinstance(err, str):
            message = err
        if not message:
            message = raw[:500].decode("utf-8", "replace") or f"upstream answered HTTP {status}"
        # vLLM names its errors after exception classes ("NotFoundError", "BadRequestError"); map
        # the ones a client acts on to OpenAI's names.
        if status == 404 and (err_type in (None, "NotFoundError") or "model" in message.lower()):
            err_type, code = "invalid_request_error", "model_not_found"
        elif status == 400 and err_type in (None, "BadRequestError"):
            err_type = "invalid_request_error"
        if code is not None and code.isdigit():
            code = None
        status = status if 400 <= status <= 599 else 502
        return cls(status, f"upstream: {message}", err_type=err_type, param=param, code=code)


def _str_or_none(v: object) -> str | None:
    return None if v is None else str(v)


def status_of(err: SharpenError) -> int:
    """The HTTP status ``err`` is answered with."""
    return err.http_status if isinstance(err, UpstreamStatusError) else err.status


def as_sharpen_error(exc: BaseException) -> SharpenError:
    """Any exception as the error the client sees: ours as they are, anything else a 500 that
    keeps its details in the server log."""
    return exc if isinstance(exc, SharpenError) else InternalError()
