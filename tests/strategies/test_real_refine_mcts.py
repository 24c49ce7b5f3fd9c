"""critique_refine and mcts end to end on the real vLLM (SmolLM2-135M on CPU): both answer a
small question through sharpen with a trace, and the usage they report is the sum over their
upstream calls. Sized to stay well under a minute once the shared server is up."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.proxy_server import ProxyServer
from tests.real_backend import RealVLLM

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]

QUESTION = [{"role": "user", "content": "What is 2 + 3? Reply with the number."}]


@pytest.fixture(scope="module")
def client(real_proxy: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=real_proxy.url, api_key="unused", timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(real_vllm: RealVLLM) -> str:
    return real_vllm.served_name


def _ask(client: openai.OpenAI, model: str, strategy: dict[str, Any], **kw: Any) -> dict[str, Any]:
    resp = client.chat.completions.create(model=model, messages=QUESTION,  # type: ignore[arg-type]
                                          extra_body={"strategy": strategy, "trace": True}, **kw)
    return resp.model_dump()


def _check_honest_usage(resp: dict[str, Any]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = resp["sharpen"]["trace"]["calls"]
    assert calls and all(c["ok"] for c in calls), calls
    assert resp["sharpen"]["upstream_calls"] == len(calls)
    u = resp["usage"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert u[key] == sum(c["usage"][key] for c in calls), key
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # every call really generated something and saw a prompt: the real server's counts, not zeros
    assert all(c["usage"]["prompt_tokens"] > 0 and c["usage"]["completion_tokens"] > 0 for c in calls)
    return calls


def test_critique_refine_on_the_real_model(client: openai.OpenAI, model: str) -> None:
    resp = _ask(client, model, {"name": "critique_refine", "max_rounds": 2, "critique_max_tokens": 32},
                max_tokens=24)
    answer = resp["choices"][0]["message"]["content"]
    assert isinstance(answer, str) and answer.strip()
    trace = resp["sharpen"]["trace"]
    assert trace["stopped"] in ("approved", "unchanged", "max_rounds")
    assert 1 <= len(trace["rounds"]) <= 2
    assert all(isinstance(r["critique"], str) and isinstance(r["approved"], bool) for r in trace["rounds"])
    calls = _check_honest_usage(resp)
    purposes = [c["purpose"] for c in calls]
    assert purposes[:2] == ["answer", "critique"]
    assert set(purposes) <= {"answer", "critique", "refine"}
    assert len(calls) <= 4  # answer + 2 critiques + 1 refine at most
    assert all(c["usage"]["completion_tokens"] <= 32 for c in calls)
    u = resp["sharpen"]["uncertainty"]
    assert u in (0.0, 0.5, 1.0)


CODE_QUESTION = [
    {"role": "system", "content": "You answer with a Python program in a ```python code block, nothing else."},
    {"role": "user", "content": "Print the sum of 2 and 3."},
]


def test_critique_refine_with_tools_runs_the_model_code_in_the_sandbox(client: openai.OpenAI, model: str) -> None:
    """CRITIC's tool on the real model: its Python runs under bubblewrap and the critic sees the result."""
    resp = client.chat.completions.create(
        model=model, messages=CODE_QUESTION, max_tokens=48, temperature=0.0,  # type: ignore[arg-type]
        extra_body={"strategy": {"name": "critique_refine", "max_rounds": 1, "tools": True,
                                 "critique_max_tokens": 16}, "trace": True}).model_dump()
    answer = resp["choices"][0]["message"]["content"]
    assert "```" in answer, answer  # the prompt gets a code block out of the 135M model at temperature 0
    tool = resp["sharpen"]["trace"]["rounds"][0]["tool"]
    assert tool is not None and tool.startswith(("The code ran.", "The code failed")), tool
    assert "unavailable" not in tool
    calls = _check_honest_usage(resp)
    assert [c["purpose"] for c in calls] == ["answer", "critique"]


def test_mcts_on_the_real_model(client: openai.OpenAI, model: str) -> None:
    resp = _ask(client, model, {"name": "mcts", "iterations": 2, "k": 2, "parallel": 1, "step_tokens": 48,
                                "max_depth": 4})
    answer = resp["choices"][0]["message"]["content"]
    assert isinstance(answer, str) and answer.strip()
    trace = resp["sharpen"]["trace"]
    calls = _check_honest_usage(resp)
    expands = [c for c in calls if c["purpose"] == "expand"]
    assert 1 <= len(expands) <= 2 and all(c["n"] == 2 for c in expands)
    assert {c["purpose"] for c in calls} <= {"expand", "finish"}
    assert all(c["usage"]["completion_tokens"] <= 2 * 48 for c in expands)
    tree = trace["tree"]
    assert tree["visits"] >= 1 and tree["children"]
    assert trace["nodes"] >= 2
