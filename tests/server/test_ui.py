"""The status page over HTTP (the browser tests are in test_ui_browser.py): keys (bearer or
Basic, only here), 401 in the OpenAI shape, what a tenant sees, the assets and the eval plots,
and the traffic the summary counts."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(60)

KEYS = {"ka": "tenant-a", "kb": "tenant-b"}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def basic(key: str, user: str = "anyone") -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


@pytest.fixture
def served(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer], tmp_path: Path) -> ProxyServer:
    return make_proxy(fake_upstream.url, admin_key="adm", api_keys=KEYS, ui={"eval_dirs": [str(tmp_path / "evals")]},
                      memory={"embedder": "hashing", "distill": False})


def chat(p: ProxyServer, key: str, **extra: Any) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(p.url + "/chat/completions", json=body, headers=bearer(key), timeout=10)


def summary(p: ProxyServer, headers: dict[str, str]) -> dict[str, Any]:
    r = httpx.get(p.root + "/ui/api/summary", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.mark.parametrize("path", ["/ui", "/ui/api/summary", "/ui/static/ui.js", "/ui/evals/accuracy_vs_tokens.png"])
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), basic("wrong"), {"authorization": "Basic !!notbase64"}])
def test_no_or_bad_key_is_401(served: ProxyServer, path: str, headers: dict[str, str]) -> None:
    r = httpx.get(served.root + path, headers=headers, timeout=10)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="sharpen", charset="UTF-8"'
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == ("authentication_error", "invalid_api_key")


def test_basic_credentials_only_on_the_status_page(served: ProxyServer) -> None:
    for headers in (basic("adm"), basic("kb"), bearer("adm"), bearer("kb")):
        assert httpx.get(served.root + "/ui", headers=headers, timeout=10).status_code == 200
    # The API and the admin routes take bearer keys only: a browser's remembered Basic
    # credentials must not authorise anything that changes state.
    assert httpx.get(served.url + "/models", headers=basic("ka"), timeout=10).status_code == 401
    r = httpx.post(served.root + "/admin/adapters/rollback", headers=basic("adm"), json={}, timeout=10)
    assert r.status_code == 401


def test_page_and_assets(served: ProxyServer) -> None:
    r = httpx.get(served.root + "/ui", headers=bearer("adm"), timeout=10)
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "http" not in r.text.replace("http-equiv", "")  # nothing loaded from elsewhere
    for name, kind in (("ui.js", "text/javascript"), ("ui.css", "text/css"), ("icon.svg", "image/svg+xml")):
        a = httpx.get(f"{served.root}/ui/static/{name}", headers=bearer("kb"), timeout=10)
        assert a.status_code == 200 and a.headers["content-type"].startswith(kind)
        assert "https://" not in a.text and "//cdn" not in a.text
    missing = httpx.get(served.root + "/ui/static/..%2Fapp.py", headers=bearer("adm"), timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_tenants_see_only_their_own(served: ProxyServer) -> None:
    for _ in range(3):
        assert chat(served, "ka").status_code == 200
    assert chat(served, "kb", strategy={"name": "self_consistency", "n": 2}, memory=True).status_code == 200
    a, b, admin = summary(served, bearer("ka")), summary(served, basic("kb")), summary(served, bearer("adm"))
    assert a["viewer"] == {"tenant": "tenant-a", "admin": False}
    assert [(s["strategy"], s["requests"]) for s in a["traffic"]["strategies"]] == [("passthrough", 3)]
    assert [(s["strategy"], s["requests"]) for s in b["traffic"]["strategies"]] == [("self_consistency", 1)]
    assert b["traffic"]["uncertainty"]["count"] == 1
    assert [m["tenant"] for m in b["memory"]["tenants"]] == ["tenant-b"]
    assert b["memory"]["tenants"][0]["recalls"] == 1
    assert "replicas" not in a and "replicas" not in b
    assert "tenant-a" not in json.dumps(b) and "tenant-b" not in json.dumps(a)
    assert admin["viewer"]["admin"] is True and admin["traffic"]["requests"] == 4
    assert {m["tenant"] for m in admin["memory"]["tenants"]} >= {"tenant-b"}
    ready = httpx.get(served.root + "/ready", headers=bearer("adm"), timeout=10).json()
    assert admin["replicas"] == {"ready": True, **ready}


def test_streams_and_failures_are_counted(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    with httpx.stream("POST", served.url + "/chat/completions", headers=bearer("ka"), timeout=10,
                      json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        r.read()
    fake_upstream.fault = "400"
    assert chat(served, "ka").status_code == 400
    fake_upstream.fault = "none"
    t = summary(served, bearer("ka"))["traffic"]
    assert t["requests"] == 2 and t["errors"] == 1 and t["status"] == {"200": 1, "400": 1}
    streamed = t["strategies"][0]
    assert streamed["completion_tokens"] == fake_upstream.total_usage()["completion_tokens"] > 0
    assert streamed["upstream_calls"] == 2 and streamed["errors"] == 1


def test_eval_report_and_plots(served: ProxyServer, tmp_path: Path) -> None:
    assert summary(served, bearer("kb"))["evals"] is None
    d = tmp_path / "evals" / "run"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps([{"strategy": "passthrough", "items": 150, "accuracy": 0.5,
                                                 "ci_low": 0.42, "ci_high": 0.58}]))
    (d / "report.md").write_text("# sharpen eval: gsm\n")
    (d / "accuracy_vs_tokens.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    ev = summary(served, bearer("kb"))["evals"]
    assert (ev["title"], ev["plots"], ev["rows"][0]["items"]) == ("sharpen eval: gsm", ["accuracy_vs_tokens.png"], 150)
    r = httpx.get(served.root + "/ui/evals/accuracy_vs_tokens.png", headers=basic("kb"), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    r = httpx.get(served.root + "/ui/evals/summary.json", headers=bearer("adm"), timeout=10)
    assert r.status_code == 404


def test_open_without_keys_and_can_be_turned_off(fake_upstream: FakeUpstream,
                                                 make_proxy: Callable[..., ProxyServer]) -> None:
    # No keys configured: the server is loopback-only and everyone is the admin of "default".
    p = make_proxy(fake_upstream.url)
    assert summary(p, {})["viewer"] == {"tenant": "default", "admin": True}
    off = make_proxy(fake_upstream.url, ui={"enabled": False})
    r = httpx.get(off.root + "/ui", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
