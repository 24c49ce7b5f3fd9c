"""protocol/errors.py: the hierarchy drawn in its docstring, the OpenAI body of each error,
the normalisation of upstream error bodies, and any exception as a client error."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

import protocol.errors as errors_module
from protocol.errors import (
    InternalError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    RateLimited,
    SharpenError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    as_sharpen_error,
    status_of,
)


def _subclasses(cls: type[SharpenError]) -> set[type[SharpenError]]:
    out = set(cls.__subclasses__())
    for sub in list(out):
        out |= _subclasses(sub)
    return out


def test_the_docstring_tree_is_the_hierarchy() -> None:
    """Every class is drawn, under its real parent (indentation in the tree = depth)."""
    doc = errors_module.__doc__ or ""
    drawn: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        m = re.match(r"^\s*((?:[│ ]   )*)(?:├── |└── )?(\w+)(?: \(|$)", line.rstrip())
        if not m or not m.group(2)[0].isupper():
            continue
        depth = len(m.group(1)) // 4 + (0 if line.strip().startswith("SharpenError") else 1)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            drawn[m.group(2)] = stack[-1][1]
        stack.append((depth, m.group(2)))
    actual = {c.__name__: c.__mro__[1].__name__ for c in _subclasses(SharpenError)}
    assert drawn == actual


def test_anything_else_becomes_an_internal_error_that_hides_its_details() -> None:
    ours = InvalidRequest("x")
    assert as_sharpen_error(ours) is ours
    err = as_sharpen_error(KeyError("secret detail"))
    assert isinstance(err, InternalError) and status_of(err) == 500
    assert err.body()["error"]["code"] == "internal_error" and "secret" not in err.message


@pytest.mark.parametrize(
    ("err", "status", "code"),
    [
        (InvalidRequest("x", param="n"), 400, None),
        (ModelNotFound("x"), 404, "model_not_found"),
        (PayloadTooLarge("x"), 413, "request_too_large"),
        (RateLimited("x"), 429, "rate_limit_exceeded"),
        (UpstreamError("x"), 502, "bad_gateway"),
        (UpstreamTimeout("x"), 504, "upstream_timeout"),
        (InvalidRequest("x", code="custom"), 400, "custom"),
    ],
)
def test_error_classes(err: SharpenError, status: int, code: str | None) -> None:
    assert status_of(err) == status
    body = orjson.loads(err.body_bytes())
    assert body == {"error": {"message": "x", "type": err.type, "param": err.param, "code": code}}


@pytest.mark.parametrize(
    ("status", "raw", "want_status", "want"),
    [
        (404, b'{"error":{"message":"no route","type":"NotFoundError","code":404}}', 404,
         {"type": "invalid_request_error", "code": "model_not_found"}),
        (400, b'{"error":{"message":"bad","type":"BadRequestError","param":"n","code":"400"}}', 400,
         {"type": "invalid_request_error", "param": "n", "code": None}),
        (503, b"", 503, {"type": "upstream_error", "message": "upstream: upstream answered HTTP 503"}),
        (200, b"{}", 502, {"type": "upstream_error"}),
        (401, b'{"error":{"message":"who","type":"authentication_error","code":"invalid_api_key"}}', 401,
         {"type": "authentication_error", "code": "invalid_api_key"}),
        (500, b'{"message":"flat shape"}', 500, {"message": "upstream: flat shape"}),
    ],
)
def test_upstream_status_error_normalisation(status: int, raw: bytes, want_status: int,
                                             want: dict[str, Any]) -> None:
    err = UpstreamStatusError.from_upstream(status, raw)
    assert status_of(err) == want_status
    inner = err.body()["error"]
    assert set(inner) == {"message", "type", "param", "code"}
    for k, v in want.items():
        assert inner[k] == v

