"""Request bodies validated strictly where they are forwarded (issue 11): values sharpen would
coerce are refused instead of reaching the upstream as the strings they were, and nesting is a
400 at any depth (it was a 500 between 254 and 1,023 levels)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]


def _post(proxy: ProxyServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(proxy.url + "/chat/completions", json=body, timeout=20)


@pytest.mark.parametrize(("field", "value"), [("n", "2"), ("stream", "yes"), ("stream", 1), ("max_tokens", "16"),
                                              ("temperature", "0.5"), ("logprobs", "true"), ("model", 7),
                                              ("n", 2.5), ("trace", "yes")])
def test_values_that_would_be_coerced_are_refused(proxy: ProxyServer, fake_upstream: FakeUpstream, field: str,
                                                  value: Any) -> None:
    r = _post(proxy, {"model": "fake", "messages": MESSAGES, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert fake_upstream.completion_calls() == []  # nothing went upstream


def test_valid_values_are_forwarded_as_sent(proxy: ProxyServer, fake_upstream: FakeUpstream) -> None:
    r = _post(proxy, {"model": "fake", "messages": MESSAGES, "n": 2, "max_tokens": 8, "temperature": 1})
    assert r.status_code == 200, r.text
    sent = fake_upstream.completion_calls()[-1].json
    assert (sent["n"], sent["max_tokens"], sent["temperature"]) == (2, 8, 1)


def _nested(depth: int) -> Any:
    x: Any = 1
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("depth", [70, 253, 254, 500, 1022, 1023, 1024, 5000])
@pytest.mark.parametrize("strategy", [None, {"name": "self_consistency", "n": 2}])
def test_deep_nesting_is_a_400_at_any_depth(proxy: ProxyServer, depth: int, strategy: Any) -> None:
    body: dict[str, Any] = {"model": "fake", "messages": MESSAGES, "extra": "DEEP"}
    if strategy:
        body["strategy"] = strategy
    text = json.dumps(body).replace('"DEEP"', "[" * depth + "1" + "]" * depth)  # json.dumps would recurse
    raw = httpx.post(proxy.url + "/chat/completions", content=text.encode(), timeout=20,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400, raw.text[:300]
    assert raw.json()["error"]["type"] == "invalid_request_error"


def test_ordinary_nesting_goes_through(proxy: ProxyServer, fake_upstream: FakeUpstream) -> None:
    r = _post(proxy, {"model": "fake", "messages": MESSAGES, "extra": _nested(30)})
    assert r.status_code == 200, r.text
    assert fake_upstream.completion_calls()[-1].json["extra"] == _nested(30)
