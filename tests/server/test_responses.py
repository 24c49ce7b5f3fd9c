"""The error table: every failure reaches the client as ``{"error": {message, type, param, code}}``
with the right status, never a bare 500; and retries happen only before anything was sent."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer, free_port

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("isolated_data")]


MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "fake", "messages": MESSAGES}


def error_of(r: httpx.Response, status: int, *, code: Any = ..., err_type: str | None = None,
             param: Any = ...) -> dict[str, Any]:
    """Checks the OpenAI error shape and returns the inner error object."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] is None or isinstance(err["code"], str)
    assert err["param"] is None or isinstance(err["param"], str)
    if code is not ...:
        assert err["code"] == code
    if err_type is not None:
        assert err["type"] == err_type
    if param is not ...:
        assert err["param"] == param
    return err


def post(p: ProxyServer, body: Any = None, *, path: str = "/chat/completions", **kw: Any) -> httpx.Response:
    kw.setdefault("timeout", 10)
    if body is not None:
        kw["content"] = body if isinstance(body, bytes) else orjson.dumps(body)
        kw.setdefault("headers", {})["content-type"] = "application/json"
    return httpx.post(p.url + path, **kw)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on (bound, never listening, so nobody else takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def _shared(isolated_data: None) -> Iterator[tuple[FakeUpstream, ProxyServer]]:
    with FakeUpstream() as up, ProxyServer(up.url) as p:
        yield up, p


@pytest.fixture
def quick_fake(_shared: tuple[FakeUpstream, ProxyServer]) -> FakeUpstream:
    """The fake behind ``quick_proxy``, its records cleared (for tests that leave its knobs alone)."""
    _shared[0].clear()
    return _shared[0]


@pytest.fixture
def quick_proxy(_shared: tuple[FakeUpstream, ProxyServer], quick_fake: FakeUpstream) -> ProxyServer:
    """A proxy with default settings shared by this module's request-validation tests."""
    return _shared[1]


# ------------------------------------------------------------------------ 400


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"model": "fake",', b"\xff\xfe", b"[1, 2"])
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_malformed_json_is_400(quick_proxy: ProxyServer, raw: bytes, path: str) -> None:
    err = error_of(post(quick_proxy, raw, path=path), 400, err_type="invalid_request_error")
    assert "JSON" in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake"}, "messages"),
        ({"model": "fake", "messages": []}, "messages"),
        ({"model": "fake", "messages": "hi"}, "messages"),
        ({"model": "fake", "messages": [{"content": "x"}]}, "messages.0.role"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "temperature": 5}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "top_logprobs": 50}, "top_logprobs"),
        ({**CHAT, "model": 7}, "model"),
        ({**CHAT, "stream": "sometimes"}, "stream"),
        ({**CHAT, "strategy": "no-such-strategy"}, "strategy"),
        ({**CHAT, "strategy": {"nope": 1}}, "strategy"),
    ],
)
def test_schema_violations_are_400_with_param(quick_fake: FakeUpstream, quick_proxy: ProxyServer,
                                              body: dict[str, Any], param: str) -> None:
    error_of(post(quick_proxy, body), 400, err_type="invalid_request_error", param=param)
    assert quick_fake.completion_calls() == []


@pytest.mark.parametrize(("body", "param"), [({"model": "fake"}, "prompt"),
                                             ({"model": "fake", "prompt": "x", "logprobs": 99}, "logprobs")])
def test_completions_schema_violations(quick_proxy: ProxyServer, body: dict[str, Any], param: str) -> None:
    error_of(post(quick_proxy, body, path="/completions"), 400, param=param)


@pytest.mark.parametrize("body", [[1, 2], "text", 3, None])
def test_body_must_be_an_object(quick_proxy: ProxyServer, body: Any) -> None:
    error_of(post(quick_proxy, orjson.dumps(body)), 400, err_type="invalid_request_error")


def test_sdk_sees_a_bad_request_error(quick_proxy: ProxyServer) -> None:
    client = openai.OpenAI(base_url=quick_proxy.url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake", messages=MESSAGES, temperature=5)  # type: ignore[arg-type]
    assert info.value.param == "temperature"


# ------------------------------------------------------------------------ 401, 404


def test_missing_and_wrong_key_are_401(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, api_keys={"sk-a": "tenant-a"})
    r = post(p, CHAT)
    error_of(r, 401, code="invalid_api_key", err_type="authentication_error")
    assert r.headers["www-authenticate"] == "Bearer"
    error_of(post(p, CHAT, headers={"Authorization": "Bearer sk-b"}), 401, code="invalid_api_key")
    error_of(post(p, CHAT, headers={"Authorization": "Basic c2stYQ=="}), 401, code="invalid_api_key")
    assert fake_upstream.completion_calls() == []
    assert post(p, CHAT, headers={"Authorization": "Bearer sk-a"}).status_code == 200


def test_auth_is_checked_before_the_body(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, api_keys={"sk-a": "tenant-a"})
    error_of(post(p, b"{broken"), 401)


def test_unknown_model_is_404(quick_proxy: ProxyServer) -> None:
    err = error_of(post(quick_proxy, {**CHAT, "model": "gpt-17"}), 404, code="model_not_found",
                   err_type="invalid_request_error", param="model")
    assert "gpt-17" in err["message"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/v1/load_lora_adapter"), ("GET", "/"),
                                              ("DELETE", "/v2/chat/completions")])
def test_unknown_route_is_404_openai_shaped(quick_proxy: ProxyServer, method: str, path: str) -> None:
    error_of(httpx.request(method, quick_proxy.root + path, timeout=5), 404, code="not_found",
             err_type="invalid_request_error")


def test_wrong_method_on_a_known_route_is_405_openai_shaped(quick_proxy: ProxyServer) -> None:
    r = httpx.get(quick_proxy.url + "/chat/completions", timeout=5)
    error_of(r, 405)
    assert "POST" in r.headers["allow"]


# ------------------------------------------------------------------------ 413


@pytest.fixture
def small_proxy(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return make_proxy(fake_upstream.url, max_body_bytes=1024)


def big_body(size: int) -> bytes:
    return orjson.dumps({"model": "fake", "messages": [{"role": "user", "content": "x" * size}]})


def test_over_max_body_bytes_with_content_length_is_413(fake_upstream: FakeUpstream, small_proxy: ProxyServer) -> None:
    r = post(small_proxy, big_body(4000))
    error_of(r, 413, code="request_too_large", err_type="invalid_request_error")
    assert fake_upstream.completion_calls() == []
    assert post(small_proxy, big_body(100)).status_code == 200  # under the limit still works


def test_over_max_body_bytes_chunked_is_413(fake_upstream: FakeUpstream, small_proxy: ProxyServer) -> None:
    data = big_body(4000)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 300):
            yield data[i : i + 300]

    r = httpx.post(small_proxy.url + "/chat/completions", content=chunks(), timeout=10,
                   headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    error_of(r, 413, code="request_too_large")
    assert fake_upstream.completion_calls() == []


# ------------------------------------------------------------------------ 429


def test_over_max_concurrency_is_429(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, max_concurrency=1)
    fake_upstream.ttft = 1.0
    first: list[httpx.Response] = []
    t = threading.Thread(target=lambda: first.append(post(p, CHAT)))
    t.start()
    try:
        assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 1, timeout=3)
        r = post(p, CHAT)
        error_of(r, 429, code="rate_limit_exceeded", err_type="rate_limit_error")
        assert r.headers["retry-after"] == "1"
    finally:
        t.join()
    assert first[0].status_code == 200
    assert len(fake_upstream.completion_calls()) == 1
    fake_upstream.ttft = 0
    assert post(p, CHAT).status_code == 200  # the slot is free again


def test_429_comes_before_any_other_work(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> None:
    """Admission is the pipeline's first stage: a refused request does not resolve its model (an
    unknown one would cost an upstream /models call and answer 404), validate or recall."""
    p = make_proxy(fake_upstream.url, max_concurrency=1)
    fake_upstream.ttft = 1.0
    first: list[httpx.Response] = []
    t = threading.Thread(target=lambda: first.append(post(p, CHAT)))
    t.start()
    try:
        assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 1, timeout=3)
        seen = len(fake_upstream.requests)
        error_of(post(p, {**CHAT, "model": "no-such-model"}), 429, code="rate_limit_exceeded")
        error_of(post(p, {"messages": []}), 429, code="rate_limit_exceeded")
        assert len(fake_upstream.requests) == seen
    finally:
        t.join()
    fake_upstream.ttft = 0
    error_of(post(p, {**CHAT, "model": "no-such-model"}), 404, code="model_not_found")
    error_of(post(p, {"messages": []}), 400)
    assert post(p, CHAT).status_code == 200  # refused requests gave their slots back


# ------------------------------------------------------------------------ 502, 504


def test_unreachable_upstream_is_502(make_proxy: Callable[..., ProxyServer], closed_port: int) -> None:
    p = make_proxy(f"http://127.0.0.1:{closed_port}/v1", upstream={"retry_backoff": 0.01})
    err = error_of(post(p, CHAT), 502, err_type="upstream_error")
    assert err["code"] == "bad_gateway"


def test_upstream_that_comes_up_later_is_used(make_proxy: Callable[..., ProxyServer]) -> None:
    port = free_port()
    p = make_proxy(f"http://127.0.0.1:{port}/v1", upstream={"retry_backoff": 0.01})
    error_of(post(p, CHAT), 502)
    with FakeUpstream(port=port) as up:
        time.sleep(1.05)  # the model list is re-fetched at most once a second
        r = post(p, CHAT)
        assert r.status_code == 200, r.text
        assert len(up.completion_calls()) == 1


def test_upstream_gone_after_start_is_502(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    assert post(proxy, CHAT).status_code == 200
    fake_upstream.stop()
    error_of(post(proxy, CHAT), 502, code="bad_gateway")
    error_of(post(proxy, {**CHAT, "stream": True}), 502, code="bad_gateway")  # before any byte: a plain error


@pytest.mark.parametrize("stream", [False, True])
def test_garbage_from_upstream(fake_upstream: FakeUpstream, proxy: ProxyServer, stream: bool) -> None:
    fake_upstream.fault = "garbage"
    r = post(proxy, {**CHAT, "stream": stream})
    if not stream:
        error_of(r, 502, code="bad_gateway", err_type="upstream_error")
    else:  # a stream is relayed as it comes: the garbage event reaches the client, then the end
        assert r.status_code == 200
        assert r.content == b"data: {not json\n\n"


@pytest.mark.parametrize("body", [b"{not js", b'{"id": "x", "choices": []}'])
def test_streamed_request_answered_without_an_event_stream_is_502(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                                   body: bytes) -> None:
    # a 200 that is not text/event-stream: relayed, the SDK would get 0 chunks and raise nothing
    fake_upstream.push_response(200, body)
    r = post(proxy, {**CHAT, "stream": True})
    error_of(r, 502, code="bad_gateway", err_type="upstream_error")
    assert "not an event stream" in r.json()["error"]["message"]
    assert post(proxy, {**CHAT, "stream": True}).status_code == 200  # the next stream is relayed as usual


def test_truncated_json_body_is_502_not_retried(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.fault = "drop_mid"
    error_of(post(proxy, CHAT), 502, code="bad_gateway")
    assert len(fake_upstream.completion_calls()) == 1  # headers had come: the call may have run


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_first_byte_timeout_is_504(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer],
                                            stream: bool) -> None:
    p = make_proxy(fake_upstream.url, upstream={"timeouts": {"first_byte": 0.5}})
    fake_upstream.fault = "hang"
    t0 = time.monotonic()
    error_of(post(p, {**CHAT, "stream": stream}), 504, code="upstream_timeout", err_type="timeout_error")
    assert 0.4 < time.monotonic() - t0 < 3
    assert len(fake_upstream.completion_calls()) == 1  # a timeout is not retried: the upstream may be working


def test_upstream_idle_timeout_on_non_stream_body_is_504(fake_upstream: FakeUpstream,
                                                         make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, upstream={"timeouts": {"first_byte": 0.5}})
    fake_upstream.ttft = 3.0  # non-stream: headers only after the whole answer
    error_of(post(p, CHAT), 504, code="upstream_timeout")


# ------------------------------------------------------------------------ upstream error statuses


@pytest.mark.parametrize(
    ("status", "body", "want"),
    [
        (400, {"error": {"message": "max_tokens too big", "type": "BadRequestError", "param": "max_tokens",
                         "code": 400}},
         {"type": "invalid_request_error", "param": "max_tokens", "code": None}),
        (404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": None,
                         "code": 404}},
         {"type": "invalid_request_error", "code": "model_not_found"}),
        (422, {"detail": "Unprocessable thing"}, {"type": "invalid_request_error", "code": None}),
        (429, {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                         "code": "rate_limit_exceeded"}},
         {"type": "rate_limit_error", "code": "rate_limit_exceeded"}),
        (500, {"error": {"message": "EngineCore died", "type": "InternalServerError", "param": None,
                         "code": 500}}, {"code": None}),
        (500, "Internal Server Error", {"code": None}),
        (501, {"object": "error", "message": "nope", "type": "NotImplementedError", "code": 501}, {"code": None}),
        (413, {"error": "body too big"}, {"type": "invalid_request_error", "code": None}),
    ],
)
def test_upstream_error_statuses_are_normalised(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer],
                                                status: int, body: Any, want: dict[str, Any]) -> None:
    p = make_proxy(fake_upstream.url, upstream={"retries": 0})
    fake_upstream.push_response(status, body)
    err = error_of(post(p, CHAT), status)
    for k, v in want.items():
        assert err[k] == v, (k, err)
    assert err["message"].startswith("upstream: ")
    assert len(err["message"]) > len("upstream: ")


def test_upstream_fault_status_through_the_sdk(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.fault = "400"
    client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake", messages=MESSAGES)  # type: ignore[arg-type]
    assert "injected fault 400" in info.value.message
    assert info.value.code is None  # vLLM's integer code never passes through


# ------------------------------------------------------------------------ retries


def test_503s_are_retried_before_anything_is_sent(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    busy = {"error": {"message": "busy", "type": "ServiceUnavailableError", "param": None, "code": 503}}
    fake_upstream.push_response(503, busy)
    fake_upstream.push_response(503, busy)
    r = post(proxy, CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].endswith("The answer is 42.")
    assert len(fake_upstream.completion_calls()) == 3


def test_retries_give_up_after_the_configured_count(fake_upstream: FakeUpstream,
                                                    make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, upstream={"retries": 1})
    fake_upstream.fault = "503"
    error_of(post(p, CHAT), 503)
    assert len(fake_upstream.completion_calls()) == 2


def test_500_is_not_retried(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.fail_n = 2  # the fake's fail_n answers 500
    error_of(post(proxy, CHAT), 500, code=None)
    assert len(fake_upstream.completion_calls()) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_connection_dropped_before_headers_is_retried(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                      stream: bool) -> None:
    fake_upstream.fault = "drop"
    error_of(post(proxy, {**CHAT, "stream": stream}), 502, code="bad_gateway")
    assert len(fake_upstream.completion_calls()) == 3


def test_drop_mid_stream_is_not_retried(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.fault = "drop_mid"
    r = post(proxy, {**CHAT, "stream": True})
    assert r.status_code == 200
    assert b"event: error\n" in r.content
    time.sleep(0.2)  # a retry would have shown up by now
    assert len(fake_upstream.completion_calls()) == 1


# ------------------------------------------------------------------------ never a bare 500


def test_unexpected_exception_is_an_openai_shaped_500(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(proxy.app.services.models, "resolve", boom)
    error_of(post(proxy, CHAT), 500, code="internal_error", err_type="server_error")
    monkeypatch.setattr(proxy.app.services, "model_cards", boom)
    error_of(httpx.get(proxy.url + "/models", timeout=5), 500, code="internal_error")
