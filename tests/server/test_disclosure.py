"""What /ready and /metrics show (issue 11): no credentials from the upstream URL, and no other
tenant's model or adapter names and token counts unless the caller is the admin."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from server.redact import redact_url
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)

KEYS = {"ka": "team-a", "kb": "team-b"}


@pytest.mark.parametrize(("url", "shown"), [
    ("http://user:s3cret@10.0.0.5:8000/v1?api_key=k3y#frag", "http://10.0.0.5:8000/v1"),
    ("https://tok3n@upstream.internal/v1", "https://upstream.internal/v1"),
    ("http://[::1]:9000/v1", "http://[::1]:9000/v1"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_ready_shows_no_upstream_credentials(fake_upstream: FakeUpstream,
                                             make_proxy: Callable[..., ProxyServer]) -> None:
    host = fake_upstream.url.split("://", 1)[1]
    p = make_proxy(f"http://admin:s3cret-pass@{host}?token=q-s3cret", api_keys=KEYS, admin_key="adm",
                   memory={"enabled": False})
    r = httpx.get(p.root + "/ready", headers={"authorization": "Bearer kb"}, timeout=10)
    assert "s3cret" not in r.text
    assert r.json()["upstream"] == f"http://{host}"


def test_metrics_per_model_only_for_the_admin(fake_upstream: FakeUpstream,
                                              make_proxy: Callable[..., ProxyServer]) -> None:
    p = make_proxy(fake_upstream.url, api_keys=KEYS, admin_key="adm", memory={"enabled": False})
    r = httpx.post(p.url + "/chat/completions", headers={"authorization": "Bearer ka"}, timeout=10,
                   json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    tenant = httpx.get(p.root + "/metrics", headers={"authorization": "Bearer kb"}, timeout=10).text
    admin = httpx.get(p.root + "/metrics", headers={"authorization": "Bearer adm"}, timeout=10).text
    assert 'sharpen_tokens_total{kind="completion"}' in tenant  # the totals stay visible
    assert "sharpen_model_tokens" not in tenant and 'model="fake"' not in tenant
    assert 'sharpen_model_tokens_total{kind="completion",model="fake"}' in admin


ADMIN = {"authorization": "Bearer adm"}


@pytest.fixture
def served(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return make_proxy(fake_upstream.url, api_keys=KEYS, admin_key="adm",
                      memory={"embedder": "hashing", "distill": False})


@pytest.mark.parametrize(("method", "path", "headers", "body"), [
    ("POST", "/v1/feedback", {"authorization": "Bearer ka"}, {"id": "X" * 100_000, "score": 0.5}),
    ("DELETE", "/admin/memory/" + "X" * 5000, ADMIN, None),
    ("GET", "/admin/adaptation/jobs/" + "X" * 5000, ADMIN, None),
    ("POST", "/v1/chat/completions", {"authorization": "Bearer ka"},
     {"model": "X" * 100_000, "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/nowhere/" + "X" * 5000, {"authorization": "Bearer ka"}, None),
])
def test_echoed_ids_are_clipped(served: ProxyServer, method: str, path: str, headers: dict[str, str],
                                body: object) -> None:
    r = httpx.request(method, served.root + path, headers=headers, json=body, timeout=10)
    assert r.status_code in (404, 503), r.text  # 503: adaptation is off on this server
    assert len(r.text) < 1000, len(r.text)
    assert "error" in r.json()


@pytest.mark.parametrize(("query", "param"), [("offset=9223372036854775808", "offset"), ("limit=abc", "limit"),
                                              ("offset=1e400", "offset")])
def test_bad_query_parameters_are_openai_shaped_400s(served: ProxyServer, query: str, param: str) -> None:
    r = httpx.get(served.root + "/admin/memory?" + query, headers=ADMIN, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
