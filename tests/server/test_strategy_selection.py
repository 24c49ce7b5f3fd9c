"""How a request picks its strategy (body, header, model@strategy, preset, server default), the
strict validation of that choice, and the server's caps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)
HTTP = httpx.Client(timeout=20)  # one client: a new one per request costs more than the request


NO_MEMORY = {"enabled": False}


SHARED_SERVER = True  # one fake and one proxy for the module (tests/conftest.py)

MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]
VALID = ["best_of_n", "passthrough", "self_consistency"]


def post(proxy: ProxyServer, body: dict[str, Any], *, headers: dict[str, str] | None = None,
         path: str = "/chat/completions") -> httpx.Response:
    return HTTP.post(proxy.url + path, json=body, headers=headers or {}, timeout=20)


def chat(strategy: Any = None, model: str = "fake", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, **extra}
    if strategy is not None:
        body["strategy"] = strategy
    return body


def first_call(fake: FakeUpstream) -> RecordedRequest:
    return fake.completion_calls()[0]


def error(resp: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    return err


# ---------------------------------------------------------------------------- selection


def test_no_strategy_is_passthrough(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = post(proxy, chat())
    assert r.status_code == 200
    assert "sharpen" not in r.json()
    assert "n" not in first_call(fake_upstream).json


def test_body_strategy_as_a_name(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = post(proxy, chat("self_consistency"))
    assert r.json()["sharpen"]["strategy"] == "self_consistency"
    call = first_call(fake_upstream)
    assert call.json["n"] == 8  # the strategy's default
    assert "strategy" not in call.json


def test_body_strategy_as_an_object(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = post(proxy, chat({"name": "best_of_n", "n": 3, "verifiers": ["agreement"], "pal": 0}, trace=True))
    s = r.json()["sharpen"]
    assert s["strategy"] == "best_of_n"
    assert s["trace"]["options"]["n"] == 3
    assert first_call(fake_upstream).json["n"] == 3
    assert "trace" not in first_call(fake_upstream).json


def test_openai_sdk_extra_body(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    c = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0)
    r = c.chat.completions.create(model="fake", messages=MESSAGES,  # type: ignore[arg-type]
                                  extra_body={"strategy": {"name": "self_consistency", "n": 2}})
    assert r.model_dump()["sharpen"]["strategy"] == "self_consistency"


def test_header(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = post(proxy, chat(), headers={"X-Sharpen-Strategy": "self_consistency"})
    assert r.json()["sharpen"]["strategy"] == "self_consistency"
    assert first_call(fake_upstream).json["n"] == 8


def test_model_suffix(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = post(proxy, chat(model="fake@self_consistency"))
    assert r.json()["sharpen"]["strategy"] == "self_consistency"
    assert first_call(fake_upstream).json["model"] == "fake"  # the upstream sees the bare model


def test_model_suffix_that_is_no_strategy_stays_part_of_the_name(fake_upstream: FakeUpstream,
                                                                  proxy: ProxyServer) -> None:
    err = error(post(proxy, chat(model="fake@nothing")), 404)
    assert "fake@nothing" in err["message"]
    assert fake_upstream.completion_calls() == []


def test_preset(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> None:
    proxy = make_proxy(fake_upstream.url, strategies={
        "presets": {"smart": {"model": "fake", "strategy": {"name": "best_of_n", "n": 3, "verifiers": ["agreement"],
                                                            "pal": 0}}}})
    r = post(proxy, chat(model="smart", trace=True))
    s = r.json()["sharpen"]
    assert s["strategy"] == "best_of_n" and s["trace"]["options"]["n"] == 3
    assert first_call(fake_upstream).json["model"] == "fake"
    # a request's own strategy wins over the preset's, the preset's model still applies
    fake_upstream.clear()
    r = post(proxy, chat("self_consistency", model="smart"))
    assert r.json()["sharpen"]["strategy"] == "self_consistency"
    assert first_call(fake_upstream).json["model"] == "fake"


def test_server_default(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> None:
    proxy = make_proxy(fake_upstream.url, strategies={"default": "self_consistency"})
    assert post(proxy, chat()).json()["sharpen"]["strategy"] == "self_consistency"
    # a client can still ask for the plain pass-through
    r = post(proxy, chat("passthrough"))
    assert r.status_code == 200 and "sharpen" not in r.json()
    # the default is for chat; /v1/completions keeps passing through
    r = post(proxy, {"model": "fake", "prompt": "hi"}, path="/completions")
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"


def test_precedence_body_header_suffix_preset_default(fake_upstream: FakeUpstream,
                                                      make_proxy: Callable[..., ProxyServer]) -> None:
    proxy = make_proxy(fake_upstream.url, strategies={
        "default": {"name": "self_consistency", "n": 5},
        "presets": {"smart": {"model": "fake", "strategy": {"name": "best_of_n", "n": 3,
                                                               "verifiers": ["agreement"], "pal": 0}}},
    })
    header = {"X-Sharpen-Strategy": "passthrough"}

    def pick(body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[str, int | None]:
        fake_upstream.clear()
        r = post(proxy, body, headers=headers)
        assert r.status_code == 200, r.text
        s = r.json().get("sharpen")
        call = first_call(fake_upstream)
        assert call.json["model"] == "fake"
        return ("passthrough" if s is None else s["strategy"]), call.json.get("n")

    body_sc = {"name": "self_consistency", "n": 2}
    assert pick(chat(body_sc, model="smart@self_consistency"), header) == ("self_consistency", 2)  # body
    assert pick(chat(model="smart@self_consistency"), header) == ("passthrough", None)  # header
    assert pick(chat(model="smart@self_consistency")) == ("self_consistency", 8)  # suffix
    assert pick(chat(model="smart")) == ("best_of_n", 3)  # preset
    assert pick(chat()) == ("self_consistency", 5)  # server default


def test_models_list_strategy_variants(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = HTTP.get(proxy.url + "/models", timeout=10)
    ids = [m["id"] for m in r.json()["data"]]
    assert "fake" in ids
    assert "fake@best_of_n" in ids and "fake@self_consistency" in ids
    assert "fake@passthrough" not in ids
    card = next(m for m in r.json()["data"] if m["id"] == "fake@best_of_n")
    assert (card["parent"], card["strategy"]) == ("fake", "best_of_n")
    # and each listed variant is usable as a model name
    c = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0)
    assert {m.id for m in c.models.list()} >= {"fake@best_of_n", "fake@self_consistency"}


def test_models_list_presets(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer],
                             tmp_path: Path) -> None:
    presets = {"smart": {"model": "fake", "strategy": {"name": "best_of_n", "n": 4}},
               "cheap": {"strategy": "self_consistency"},  # the upstream's default model
               "plain": {"model": "fake"},  # the server's default strategy
               "a-only": {"model": "fake-tenant-a-v1", "strategy": "auto"}}  # tenant a's adapter
    p = make_proxy(fake_upstream.url, api_keys={"ka": "tenant-a", "kb": "tenant-b"},
                   strategies={"presets": presets, "default": "auto"},
                   adapt={"enabled": True, "tenants": ["tenant-a"], "base_model_path": str(tmp_path)})
    assert p.app.services.adapt is not None
    p.app.services.adapt.registry.new_version("tenant-a", "fake", tmp_path, parent=None, data_hash="", hyper={})

    def listed(key: str) -> dict[str, dict[str, Any]]:
        r = HTTP.get(p.url + "/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
        return {m["id"]: m for m in r.json()["data"] if m.get("preset")}

    b = listed("kb")
    assert b["smart"] == {"id": "smart", "object": "model", "created": 0, "owned_by": "sharpen", "root": "fake",
                               "parent": "fake", "strategy": {"name": "best_of_n", "n": 4}, "preset": True}
    assert (b["cheap"]["root"], b["cheap"]["strategy"]) == ("fake", "self_consistency")
    assert b["plain"]["strategy"] == "auto"
    assert "a-only" not in b  # another tenant's adapter stays invisible behind a preset too
    assert listed("ka")["a-only"]["root"] == "fake-tenant-a-v1"
    # and the SDK lists them as models, usable by name
    c = openai.OpenAI(base_url=p.url, api_key="kb", max_retries=0)
    assert {"smart", "cheap", "plain"} <= {m.id for m in c.models.list()}
    r = c.chat.completions.create(model="smart", messages=[{"role": "user", "content": "hi"}])
    assert r.model_extra is not None and r.model_extra["sharpen"]["strategy"] == "best_of_n"


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("where", ["body", "header", "object"])
def test_unknown_strategy_lists_the_valid_ones(fake_upstream: FakeUpstream, proxy: ProxyServer, where: str) -> None:
    if where == "header":
        r = post(proxy, chat(), headers={"X-Sharpen-Strategy": "tree_of_thought"})
    else:
        r = post(proxy, chat("tree_of_thought" if where == "body" else {"name": "tree_of_thought"}))
    err = error(r)
    assert err["param"] == "strategy"
    assert err["type"] == "invalid_request_error"
    assert "tree_of_thought" in err["message"]
    for name in VALID:
        assert name in err["message"]
    assert fake_upstream.completion_calls() == []


def test_unknown_option_field_is_named(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    err = error(post(proxy, chat({"name": "best_of_n", "n": 2, "num_candidates": 4})))
    assert err["param"] == "strategy.num_candidates"
    assert "num_candidates" in err["message"]
    err = error(post(proxy, chat({"name": "self_consistency", "verifiers": ["approval"]})))
    assert err["param"] == "strategy.verifiers"
    assert fake_upstream.completion_calls() == []


@pytest.mark.parametrize(
    ("strategy", "param"),
    [
        ({"name": "best_of_n", "n": -3}, "strategy.n"),
        ({"name": "best_of_n", "n": 0}, "strategy.n"),
        ({"name": "self_consistency", "n": 0}, "strategy.n"),
        ({"name": "self_consistency", "n": "many"}, "strategy.n"),
        ({"name": "best_of_n", "verifiers": ["approval", "astrology"]}, "strategy.verifiers"),
        ({"name": "best_of_n", "verifiers": []}, "strategy.verifiers"),
        ({"name": "best_of_n", "temperature": 0}, "strategy.temperature"),
        ({"name": "best_of_n", "verifier_style": "long"}, "strategy.verifier_style"),
        ({"name": "best_of_n", "n": 2, "verifiers": ["regex"]}, "strategy.verifier_regex"),
        ({"name": "self_consistency", "deadline_s": 0}, "strategy.deadline_s"),
        ({"name": "self_consistency", "max_upstream_tokens": 0}, "strategy.max_upstream_tokens"),
        ({"n": 2}, "strategy"),
        # wire validation of the union type reports "strategy.str" (server/wire.py); the prefix is what counts
        (42, "strategy"),
    ],
)
def test_bad_option_values(fake_upstream: FakeUpstream, proxy: ProxyServer, strategy: Any, param: str) -> None:
    err = error(post(proxy, chat(strategy)))
    assert err["param"] == param or (strategy == 42 and err["param"].startswith("strategy")), err
    if param.startswith("strategy."):
        assert param.removeprefix("strategy.") in err["message"]
    assert fake_upstream.completion_calls() == []


@pytest.mark.parametrize("strategy", ["critique_refine", "mcts", {"name": "self_consistency", "n": 2}])
def test_an_n_the_strategy_cannot_serve_is_the_same_400(proxy: ProxyServer, strategy: Any) -> None:
    """critique_refine and mcts build one answer: n=3 is refused like any strategy's, never
    silently answered with one choice."""
    r = post(proxy, {"messages": MESSAGES, "strategy": strategy, "n": 3})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "n" and err["type"] == "invalid_request_error"
    assert "returns at most" in err["message"]


CAPS = {"max_n": 4, "max_verifier_calls": 8, "max_upstream_tokens": 1000, "deadline_s": 5}


@pytest.fixture(scope="module")
def capped(module_server: tuple[FakeUpstream, ProxyServer]) -> Iterator[ProxyServer]:
    with ProxyServer(module_server[0].url, memory=NO_MEMORY, strategies=CAPS) as proxy:
        yield proxy


@pytest.mark.parametrize(
    ("strategy", "param"),
    [
        ({"name": "self_consistency", "n": 5}, "strategy.n"),
        ({"name": "best_of_n", "n": 5, "verifiers": ["agreement"]}, "strategy.n"),
        ({"name": "best_of_n", "n": 4, "verifiers": ["approval", "math_steps", "rederive"]}, "strategy.verifiers"),
        ({"name": "best_of_n", "n": 3, "verifiers": ["approval", "math_steps", "rederive"]}, "strategy.verifiers"),
        ({"name": "self_consistency", "n": 2, "max_upstream_tokens": 2000}, "strategy.max_upstream_tokens"),
        ({"name": "best_of_n", "n": 2, "deadline_s": 10}, "strategy.deadline_s"),
    ],
)
def test_caps_exceeded(fake_upstream: FakeUpstream, capped: ProxyServer, strategy: Any,
                       param: str) -> None:
    proxy = capped
    err = error(post(proxy, chat(strategy)))
    assert err["param"] == param, err
    assert "capped" in err["message"] or "allows" in err["message"]
    assert fake_upstream.completion_calls() == []


def test_within_caps_and_defaults_fit_them(fake_upstream: FakeUpstream, capped: ProxyServer) -> None:
    proxy = capped
    r = post(proxy, chat({"name": "best_of_n", "n": 4, "verifiers": ["approval", "rederive"],
                          "max_upstream_tokens": 1000, "deadline_s": 5}))
    assert r.status_code == 200, r.text
    # options the client left out are brought within the caps instead of failing the request
    fake_upstream.clear()
    r = post(proxy, chat("self_consistency", trace=True))
    assert r.status_code == 200, r.text
    assert r.json()["sharpen"]["trace"]["options"]["n"] == 4
    fake_upstream.clear()
    r = post(proxy, chat("best_of_n", trace=True))
    assert r.status_code == 200, r.text
    # the default verifier is the candidates' own confidence (no calls): n is the cap, and the
    # default share of program-aided candidates (a second call) is fitted to it
    options = r.json()["sharpen"]["trace"]["options"]
    assert (options["n"], options["pal"]) == (4, 2)
    assert sorted(c.json["n"] for c in fake_upstream.completion_calls()) == [2, 2]
    fake_upstream.clear()
    r = post(proxy, chat({"name": "best_of_n", "verifiers": ["approval", "rederive"], "pal": 0}, trace=True))
    assert r.status_code == 200, r.text
    assert r.json()["sharpen"]["trace"]["options"]["n"] == 4  # 4 candidates x 2 LLM aspects = 8 calls
    assert len(fake_upstream.completion_calls()) == 1 + 8


@pytest.mark.parametrize("how", ["body", "header", "suffix"])
def test_strategy_on_completions_is_400(fake_upstream: FakeUpstream, proxy: ProxyServer, how: str) -> None:
    body: dict[str, Any] = {"model": "fake", "prompt": "2 + 2 ="}
    headers = {}
    if how == "body":
        body["strategy"] = "self_consistency"
    elif how == "header":
        headers["X-Sharpen-Strategy"] = "best_of_n"
    else:
        body["model"] = "fake@self_consistency"
    err = error(post(proxy, body, headers=headers, path="/completions"))
    assert err["param"] == "strategy"
    assert "/completions" in err["message"]
    assert fake_upstream.completion_calls() == []


def test_passthrough_on_completions_is_fine(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    r = post(proxy, {"model": "fake", "prompt": "2 + 2 =", "strategy": "passthrough"}, path="/completions")
    assert r.status_code == 200, r.text
    assert "strategy" not in first_call(fake_upstream).json
