"""best_of_n's ``program_deadline`` (strategies/pal.py ``draw_until``) through the proxy against
the fake upstream, whose ``tok`` knob paces every token: a short prose call, one quick program
and three long ones. The deadline closes the streamed program call once a finished program has
printed an answer; without one finished and answered it waits for all."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(60)

SHARED_SERVER = True
LONG = 300  # lines of the slow programs: ~900 tokens, 9 s at 10 ms a token


def ask(proxy: ProxyServer, strategy: dict[str, Any]) -> dict[str, Any]:
    client = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0, timeout=30)
    r = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "What is 3 + 4?"}],
        extra_body={"strategy": {"name": "best_of_n", "n": 8, "pal": 4, **strategy}, "trace": True})
    return r.model_dump()


def script(first: str, long_lines: int = LONG) -> Any:
    def fn(body: dict[str, Any], i: int) -> str:
        if "Python program" in body["messages"][-1]["content"]:
            if i == 0:
                return first
            return "```python\n" + "x = 1\n" * long_lines + "print(7)\n```"
        return f"Path {i}. The answer is {['7', '8', '9', '7'][i]}."
    return fn


def program_call(fake: FakeUpstream) -> RecordedRequest:
    (call,) = [r for r in fake.completion_calls() if "Python program" in r.json["messages"][-1]["content"]]
    return call


def test_the_deadline_closes_the_program_call_once_a_program_answered(fake_upstream: FakeUpstream,
                                                                      proxy: ProxyServer) -> None:
    fake_upstream.tok = 0.01
    fake_upstream.script(script("```python\nprint(3 + 4)\n```"))
    t0 = time.monotonic()
    resp = ask(proxy, {})  # the default deadline, 2x
    assert resp["sharpen"]["trace"]["options"]["program_deadline"] == 2
    took = time.monotonic() - t0
    t = resp["sharpen"]["trace"]
    assert resp["choices"][0]["message"]["content"].endswith("The answer is 7.")
    assert any("programs: 1 of 4 finished by the program deadline" in n for n in t["notes"])
    programs = [c for c in t["candidates"] if c["content"].startswith("```")]
    assert len(programs) == 1 and programs[0]["answer"] == "7"
    call = program_call(fake_upstream)
    assert call.json["stream"] is True and call.json["stream_options"]["continuous_usage_stats"] is True
    # the slow programs were stopped: far fewer tokens than their ~2,700, and the usage sharpen
    # reports for the call is what it was sent (the fake may have produced a chunk more)
    spent = call.usage["completion_tokens"]  # type: ignore[index]
    assert spent < 1000
    (pal_call,) = [c for c in t["calls"] if c["purpose"] == "candidates:pal"]
    assert 3 <= pal_call["usage"]["completion_tokens"] <= spent
    assert resp["usage"]["completion_tokens"] == sum(c["usage"]["completion_tokens"] for c in t["calls"])
    assert took < 8  # not the 9 s the slow programs take


def test_no_cut_until_a_finished_program_has_printed_an_answer(fake_upstream: FakeUpstream,
                                                               proxy: ProxyServer) -> None:
    fake_upstream.tok = 0.005
    fake_upstream.script(script("```python\nx = 7\n```", long_lines=40))  # runs, prints nothing: abstains
    resp = ask(proxy, {"program_deadline": 2})
    t = resp["sharpen"]["trace"]
    assert not any("program deadline" in n for n in t["notes"])
    programs = [c for c in t["candidates"] if c["content"].startswith("```")]
    assert len(programs) == 4  # all waited for
    call = program_call(fake_upstream)
    assert call.json["stream"] is True
    (pal_call,) = [c for c in t["calls"] if c["purpose"] == "candidates:pal"]
    assert pal_call["usage"] == call.usage  # the final usage chunk: the whole call


def test_without_a_deadline_the_program_call_is_not_streamed(fake_upstream: FakeUpstream,
                                                              proxy: ProxyServer) -> None:
    fake_upstream.script(script("```python\nprint(3 + 4)\n```", long_lines=3))
    resp = ask(proxy, {"program_deadline": None})
    assert "stream" not in program_call(fake_upstream).json
    assert len([c for c in resp["sharpen"]["trace"]["candidates"] if c["content"].startswith("```")]) == 4


def test_an_upstream_that_refuses_the_streamed_call_gets_the_plain_one(fake_upstream: FakeUpstream,
                                                                       proxy: ProxyServer) -> None:
    fake_upstream.plain_stream_options = True
    fake_upstream.script(script("```python\nprint(3 + 4)\n```", long_lines=3))
    resp = ask(proxy, {})
    t = resp["sharpen"]["trace"]
    assert resp["choices"][0]["message"]["content"].endswith("The answer is 7.")
    assert any("refused a streamed program call" in n for n in t["notes"])
    programs = [r for r in fake_upstream.completion_calls() if "Python program" in r.json["messages"][-1]["content"]]
    assert [r.status for r in programs] == [400, 200] and "stream" not in programs[1].json
    assert [(c["purpose"], c["ok"]) for c in t["calls"] if c["purpose"] == "candidates:pal"] == [
        ("candidates:pal", False), ("candidates:pal", True)]
    assert len([c for c in t["candidates"] if c["content"].startswith("```")]) == 4


@pytest.mark.parametrize("value", [1, 0.5, -2, 1000])
def test_a_deadline_that_cannot_bound_anything_is_400(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                      value: float) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(proxy, {"program_deadline": value})
    assert err.value.body["param"] == "strategy.program_deadline"  # type: ignore[index]
    assert fake_upstream.completion_calls() == []
