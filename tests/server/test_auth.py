"""API keys: keys map to tenants, which routes need one, and the admin key's semantics."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import orjson
import pytest

from protocol.errors import AuthenticationFailed, PermissionDenied, status_of
from server.auth import DEFAULT_TENANT, Authenticator, Principal
from server.settings import Settings
from strategies.base import AnyRequest, Strategy, StrategyContext, StrategyResult
from strategies.passthrough import Passthrough
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("isolated_data")]


KEYS = {"sk-a": "tenant-a", "sk-b": "tenant-b"}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


class WhoAmI(Strategy):
    """Answers with the tenant the request was made for."""

    name = "whoami"
    endpoints = frozenset({"/chat/completions", "/completions"})

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        return StrategyResult(raw=orjson.dumps({"tenant": ctx.tenant}))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer],
          monkeypatch: pytest.MonkeyPatch) -> ProxyServer:
    monkeypatch.setattr("server.services.builtin_strategies", lambda: [Passthrough, WhoAmI])
    return make_proxy(fake_upstream.url, api_keys=KEYS, admin_key="sk-admin")


# ------------------------------------------------------------------------ over HTTP


@pytest.mark.parametrize(("key", "tenant"), [("sk-a", "tenant-a"), ("sk-b", "tenant-b"),
                                             ("sk-admin", DEFAULT_TENANT)])
def test_keys_map_to_tenants(keyed: ProxyServer, key: str, tenant: str) -> None:
    r = httpx.post(keyed.url + "/chat/completions", json={**CHAT, "strategy": "whoami"}, headers=bearer(key),
                   timeout=5)
    assert r.status_code == 200, r.text
    assert r.json() == {"tenant": tenant}
    r = httpx.post(keyed.url + "/completions", json={"model": "fake@whoami", "prompt": "x"}, headers=bearer(key),
                   timeout=5)
    assert r.json() == {"tenant": tenant}


def test_sdk_with_a_key(fake_upstream: FakeUpstream, keyed: ProxyServer) -> None:
    ok = openai.OpenAI(base_url=keyed.url, api_key="sk-a", max_retries=0)
    assert ok.chat.completions.create(**CHAT).choices[0].message.content  # type: ignore[call-overload]
    bad = openai.OpenAI(base_url=keyed.url, api_key="sk-zzz", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert len(fake_upstream.completion_calls()) == 1


def test_health_is_open_without_a_key(keyed: ProxyServer) -> None:
    assert httpx.get(keyed.root + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/ready", "/v1/models"])
def test_other_routes_need_a_key(keyed: ProxyServer, path: str) -> None:
    for headers in ({}, bearer("sk-wrong"), {"Authorization": "sk-a"}):
        r = httpx.get(keyed.root + path, headers=headers, timeout=5)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    for key in ("sk-a", "sk-admin"):
        assert httpx.get(keyed.root + path, headers=bearer(key), timeout=5).status_code == 200


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_completion_routes_need_a_key(fake_upstream: FakeUpstream, keyed: ProxyServer, path: str) -> None:
    r = httpx.post(keyed.url + path, json={"model": "fake", "prompt": "x", **CHAT}, timeout=5)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert fake_upstream.completion_calls() == []


def test_without_keys_everything_is_open(proxy: ProxyServer) -> None:
    for path in ("/metrics", "/ready", "/v1/models"):
        assert httpx.get(proxy.root + path, timeout=5).status_code == 200
    r = httpx.post(proxy.url + "/chat/completions", json=CHAT, headers=bearer("anything"), timeout=5)
    assert r.status_code == 200


# ------------------------------------------------------------------------ Authenticator itself


def auth(**settings: object) -> Authenticator:
    return Authenticator(Settings(**settings))  # type: ignore[arg-type]


def test_no_keys_no_admin_key_everyone_is_the_default_admin() -> None:
    a = auth()
    assert not a.enabled
    for header in (None, "", "Bearer whatever", "Basic xyz"):
        assert a.authenticate(header) == Principal(DEFAULT_TENANT, admin=True)
        assert a.require_admin(header).admin


def test_keys_map_to_tenants_and_are_not_admin() -> None:
    a = auth(api_keys=KEYS)
    assert a.enabled
    assert a.authenticate("Bearer sk-a") == Principal("tenant-a")
    assert a.authenticate("bearer   sk-b  ") == Principal("tenant-b")  # scheme case-insensitive, key trimmed
    with pytest.raises(PermissionDenied) as info:
        a.require_admin("Bearer sk-a")  # keys but no admin key: nobody is admin
    assert status_of(info.value) == 403


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic sk-a", "sk-a", "Token sk-a"])
def test_missing_key(header: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        auth(api_keys=KEYS).authenticate(header)
    assert "Missing API key" in info.value.message
    assert status_of(info.value) == 401 and info.value.code == "invalid_api_key"
    assert info.value.headers() == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize("header", ["Bearer sk-c", "Bearer tenant-a", "Bearer SK-A", "Bearer sk-a sk-b"])
def test_wrong_key(header: str) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        auth(api_keys=KEYS).authenticate(header)
    assert "Incorrect API key" in info.value.message


def test_admin_key_with_tenant_keys() -> None:
    a = auth(api_keys=KEYS, admin_key="sk-admin")
    assert a.authenticate("Bearer sk-admin") == Principal(DEFAULT_TENANT, admin=True)
    assert a.require_admin("Bearer sk-admin").admin
    assert a.authenticate("Bearer sk-a") == Principal("tenant-a", admin=False)
    with pytest.raises(PermissionDenied):
        a.require_admin("Bearer sk-a")
    with pytest.raises(AuthenticationFailed):
        a.require_admin(None)
    with pytest.raises(AuthenticationFailed):
        a.authenticate("Bearer sk-admin-not")


def test_admin_key_alone_leaves_requests_open_but_not_admin() -> None:
    a = auth(admin_key="sk-admin")
    assert not a.enabled
    assert a.authenticate(None) == Principal(DEFAULT_TENANT, admin=False)
    assert a.authenticate("Bearer random") == Principal(DEFAULT_TENANT, admin=False)
    assert a.authenticate("Bearer sk-admin") == Principal(DEFAULT_TENANT, admin=True)
    with pytest.raises(PermissionDenied):
        a.require_admin(None)
    with pytest.raises(PermissionDenied):
        a.require_admin("Bearer random")


def test_admin_key_wins_over_a_tenant_key_of_the_same_value() -> None:
    a = auth(api_keys={"sk-x": "tenant-x"}, admin_key="sk-x")
    assert a.authenticate("Bearer sk-x") == Principal(DEFAULT_TENANT, admin=True)


def test_authenticator_copies_the_keys() -> None:
    s = Settings(api_keys=dict(KEYS))
    a = Authenticator(s)
    s.api_keys["sk-late"] = "late"
    with pytest.raises(AuthenticationFailed):
        a.authenticate("Bearer sk-late")
