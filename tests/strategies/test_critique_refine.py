"""Critique and refine (strategies/critique_refine.py) through sharpen's HTTP API, against the
scripted fake upstream: when it stops, what the critic is shown (checklist, sandbox output), the
trace, and honest usage."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from strategies.sandbox import policy, runner
from strategies.sandbox.policy import MARKER
from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)

QUESTION = "What is 6 times 7? Give a number."
APPROVE = "The answer looks right.\nFINAL VERIFICATION ANSWER: True"
REJECT = "The multiplication is wrong.\nFINAL VERIFICATION ANSWER: False"


def kind(body: dict[str, Any]) -> str:
    """Which of critique_refine's prompts this upstream request is."""
    last = str(body["messages"][-1]["content"])
    if "Write a checklist" in last:
        return "checklist"
    if "Critique the proposed answer" in last:
        return "critique"
    if last.startswith("Feedback on your answer:"):
        return "refine"
    return "answer"


def proposed(body: dict[str, Any]) -> str:
    """The answer a critique request shows the critic."""
    text = str(body["messages"][-1]["content"])
    return text.split("Proposed answer:\n", 1)[1].split("\n\n", 1)[0]


NO_MEMORY = {"enabled": False}  # experience memory off: its distil calls reach the fake after the response


@pytest.fixture
def client(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> Iterator[openai.OpenAI]:
    proxy = make_proxy(fake_upstream.url, memory=NO_MEMORY)
    with openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def ask(client: openai.OpenAI, question: str = QUESTION, **options: Any) -> dict[str, Any]:
    resp = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": question}], max_tokens=64,
        extra_body={"strategy": {"name": "critique_refine", **options}, "trace": True},
    )
    return resp.model_dump()


def calls(fake: FakeUpstream) -> list[RecordedRequest]:
    return fake.completion_calls()


def kinds(fake: FakeUpstream) -> list[str]:
    return [kind(r.json) for r in calls(fake)]


def content(resp: dict[str, Any]) -> str:
    return str(resp["choices"][0]["message"]["content"])


def trace(resp: dict[str, Any]) -> dict[str, Any]:
    return resp["sharpen"]["trace"]  # type: ignore[no-any-return]


def assert_honest_usage(resp: dict[str, Any], fake: FakeUpstream) -> None:
    total = fake.total_usage()
    assert total["total_tokens"] > 0
    u = resp["usage"]
    assert {k: u[k] for k in total} == total
    per_call = trace(resp)["calls"]
    assert len(per_call) == len(calls(fake)) == resp["sharpen"]["upstream_calls"]
    for key in total:
        assert sum(c["usage"][key] for c in per_call) == total[key]


# ---- when it stops ------------------------------------------------------------------------------


def test_approved_at_round_zero(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda body, i: {"answer": "The answer is 42.", "critique": APPROVE}[kind(body)])
    resp = ask(client)
    assert content(resp) == "The answer is 42."
    assert kinds(fake_upstream) == ["answer", "critique"]
    t = trace(resp)
    assert t["stopped"] == "approved"
    assert [(r["round"], r["approved"], r["answer"]) for r in t["rounds"]] == [(0, True, "The answer is 42.")]
    assert t["rounds"][0]["critique"] == APPROVE and t["rounds"][0]["tool"] is None
    assert t["checklist"] == []
    assert [c["purpose"] for c in t["calls"]] == ["answer", "critique"]
    assert resp["sharpen"]["uncertainty"] == 0.0
    # the answer call is the client's request; the critique sees the question and the answer
    first, crit = calls(fake_upstream)
    assert first.json["messages"] == [{"role": "user", "content": QUESTION}] and first.json["max_tokens"] == 64
    assert "strategy" not in first.json and "trace" not in first.json and not first.json.get("n")
    prompt = crit.json["messages"][-1]["content"]
    assert f"Question:\n{QUESTION}" in prompt and proposed(crit.json) == "The answer is 42."
    assert crit.json["temperature"] == 0.0 and crit.json["max_tokens"] == 384
    assert_honest_usage(resp, fake_upstream)


def test_rejected_then_refined_then_approved(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    def script(body: dict[str, Any], i: int) -> str:
        k = kind(body)
        if k == "critique":
            return REJECT if "41" in proposed(body) else APPROVE
        return {"answer": "The answer is 41.", "refine": "The answer is 42."}[k]

    fake_upstream.script(script)
    resp = ask(client)
    assert content(resp) == "The answer is 42."
    assert kinds(fake_upstream) == ["answer", "critique", "refine", "critique"]
    t = trace(resp)
    assert t["stopped"] == "approved"
    assert [(r["round"], r["approved"], r["answer"]) for r in t["rounds"]] == [
        (0, False, "The answer is 41."), (1, True, "The answer is 42.")]
    assert resp["sharpen"]["uncertainty"] == 0.5
    # the refine call carries the history: the question, the first answer, and the critique
    refine = calls(fake_upstream)[2].json["messages"]
    assert refine[0] == {"role": "user", "content": QUESTION}
    assert refine[1] == {"role": "assistant", "content": "The answer is 41."}
    assert refine[2]["role"] == "user" and REJECT in refine[2]["content"]
    assert "improved, complete answer" in refine[2]["content"]
    assert [c["content"] for c in t["candidates"]] == ["The answer is 41.", "The answer is 42."]
    assert_honest_usage(resp, fake_upstream)


def test_stops_when_the_answer_stops_changing(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda body, i: {"answer": "The answer is 41.", "critique": REJECT,
                                          "refine": "  The answer is 41.  "}[kind(body)])
    resp = ask(client, max_rounds=5)
    assert kinds(fake_upstream) == ["answer", "critique", "refine"]
    t = trace(resp)
    assert t["stopped"] == "unchanged"
    assert len(t["rounds"]) == 1 and not t["rounds"][0]["approved"]
    assert "The answer is 41." in content(resp)
    assert resp["sharpen"]["uncertainty"] == 1.0
    assert_honest_usage(resp, fake_upstream)


def test_stops_after_max_rounds(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    refines = iter(range(1, 100))

    def script(body: dict[str, Any], i: int) -> str:
        k = kind(body)
        if k == "refine":
            return f"Attempt {next(refines)}: the answer is {40 + 10 * i}."
        return {"answer": "Attempt 0: the answer is 1.", "critique": REJECT}[k]

    fake_upstream.script(script)
    resp = ask(client, max_rounds=3)
    # three critiques, two refines: the last answer is critiqued too, and never refined again
    assert kinds(fake_upstream) == ["answer", "critique", "refine", "critique", "refine", "critique"]
    t = trace(resp)
    assert t["stopped"] == "max_rounds"
    assert [r["approved"] for r in t["rounds"]] == [False, False, False]
    assert [r["answer"] for r in t["rounds"]] == ["Attempt 0: the answer is 1.", "Attempt 1: the answer is 40.",
                                                  "Attempt 2: the answer is 40."]
    assert content(resp) == "Attempt 2: the answer is 40."
    assert resp["sharpen"]["uncertainty"] == 1.0
    # the second refine sees both earlier answers and critiques
    msgs = calls(fake_upstream)[4].json["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"].endswith("Try again.")
    assert_honest_usage(resp, fake_upstream)


def test_max_rounds_one_means_a_single_critique(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda body, i: {"answer": "The answer is 41.", "critique": REJECT}[kind(body)])
    resp = ask(client, max_rounds=1)
    assert kinds(fake_upstream) == ["answer", "critique"]
    assert trace(resp)["stopped"] == "max_rounds"
    assert content(resp) == "The answer is 41."


# ---- checklist (TICK) ---------------------------------------------------------------------------

CHECKLIST = "- Is the answer a single number?\n- Is the number the product of 6 and 7?\nThat is all."


@pytest.mark.parametrize(
    ("critique", "approved"),
    [
        ("1. YES\n2. YES\nFINAL VERIFICATION ANSWER: True", True),
        ("No problems found.\n- YES\n- YES\nFINAL VERIFICATION ANSWER: True", True),
        ("1. YES\n2. NO\nFINAL VERIFICATION ANSWER: True", False),  # one NO overrides the verdict
        ("YES\nFINAL VERIFICATION ANSWER: True", False),  # a missing mark is a failure
        ("1. YES\n2. YES\nFINAL VERIFICATION ANSWER: False", False),
    ],
    ids=["all-yes", "all-yes-after-prose", "one-no", "missing-mark", "verdict-false"],
)
def test_checklist(critique: str, approved: bool, client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda body, i: {"answer": "The answer is 42.", "checklist": CHECKLIST,
                                          "critique": critique}[kind(body)])
    resp = ask(client, checklist=True, max_rounds=1)
    assert kinds(fake_upstream) == ["answer", "checklist", "critique"]
    t = trace(resp)
    assert t["checklist"] == ["Is the answer a single number?", "Is the number the product of 6 and 7?"]
    assert t["rounds"][0]["approved"] is approved
    assert t["stopped"] == ("approved" if approved else "max_rounds")
    check_req, crit_req = calls(fake_upstream)[1:]
    assert QUESTION in check_req.json["messages"][0]["content"]
    prompt = crit_req.json["messages"][-1]["content"]
    assert "- Is the answer a single number?\n- Is the number the product of 6 and 7?" in prompt
    assert "YES or NO" in prompt
    assert_honest_usage(resp, fake_upstream)


def test_checklist_failure_leads_to_refine(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    def script(body: dict[str, Any], i: int) -> str:
        k = kind(body)
        if k == "critique":
            good = "42" in proposed(body)
            return f"- YES\n- {'YES' if good else 'NO'}\nFINAL VERIFICATION ANSWER: True"
        return {"answer": "The answer is 41.", "checklist": CHECKLIST, "refine": "The answer is 42."}[k]

    fake_upstream.script(script)
    resp = ask(client, checklist=True)
    assert kinds(fake_upstream) == ["answer", "checklist", "critique", "refine", "critique"]
    assert trace(resp)["stopped"] == "approved"
    assert content(resp) == "The answer is 42."


# ---- tools (CRITIC) -----------------------------------------------------------------------------


def tool_answer(code: str) -> str:
    return f"Let me compute it.\n```python\n{code}\n```\nThe answer is what it prints."


def _sandboxes_alive() -> list[str]:
    """Processes still running a sandbox (their argv carries the sandbox's marker)."""
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if MARKER.encode() in cmd:
            alive.append(pid)
    return alive


def test_tools_show_the_critic_the_sandbox_output(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    answer = tool_answer("print(sum(range(1000)))")
    fake_upstream.script(lambda body, i: {"answer": answer, "critique": APPROVE}[kind(body)])
    resp = ask(client, tools=True)
    assert kinds(fake_upstream) == ["answer", "critique"]
    prompt = calls(fake_upstream)[1].json["messages"][-1]["content"]
    assert "499500" not in answer
    assert "Running the Python code in the answer gave:\nThe code ran. Output:\n499500" in prompt
    tool = trace(resp)["rounds"][0]["tool"]
    assert tool == "The code ran. Output:\n499500"
    assert content(resp) == answer


def test_tools_abstain_without_the_sandbox(client: openai.OpenAI, fake_upstream: FakeUpstream,
                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runner, "_PROBE_OK", False)
    monkeypatch.setattr(policy, "bwrap_path", lambda: str(tmp_path / "no-bwrap-here"))
    marker = tmp_path / "ran"
    answer = tool_answer(f"open({str(marker)!r}, 'w')\nprint('ran')")
    fake_upstream.script(lambda body, i: {"answer": answer, "critique": APPROVE}[kind(body)])
    resp = ask(client, tools=True)
    tool = trace(resp)["rounds"][0]["tool"]
    assert tool.startswith("The code was not run: code execution is unavailable on this server")
    assert tool in calls(fake_upstream)[1].json["messages"][-1]["content"]
    assert not marker.exists()


def test_tools_without_code_show_nothing(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda body, i: {"answer": "The answer is 42.", "critique": APPROVE}[kind(body)])
    resp = ask(client, tools=True)
    assert trace(resp)["rounds"][0]["tool"] is None
    assert "Running the Python code" not in calls(fake_upstream)[1].json["messages"][-1]["content"]


def test_tool_error_is_shown_as_a_failure(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    answer = tool_answer("x = 6 * 7\nraise ValueError('tool-boom ' + str(x))")
    fake_upstream.script(lambda body, i: {"answer": answer, "critique": REJECT,
                                          "refine": "The answer is 42."}[kind(body)])
    fake_upstream.logprob_fn = lambda body, i, j, tok: -0.1  # equally sure drafts: the refinement stands
    resp = ask(client, tools=True, max_rounds=2)
    assert kinds(fake_upstream) == ["answer", "critique", "refine", "critique"]
    prompt = calls(fake_upstream)[1].json["messages"][-1]["content"]
    assert "The code failed (exit 1)" in prompt
    assert "ValueError: tool-boom 42" in prompt
    rounds = trace(resp)["rounds"]
    assert "ValueError: tool-boom 42" in rounds[0]["tool"]
    assert rounds[1]["tool"] is None  # the refined answer has no code
    assert content(resp) == "The answer is 42."


def test_hanging_tool_is_killed_at_its_timeout(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    answer = tool_answer("while True:\n    pass")
    fake_upstream.script(lambda body, i: {"answer": answer, "critique": APPROVE}[kind(body)])
    t0 = time.monotonic()
    resp = ask(client, tools=True, tool_timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 4.0, elapsed
    prompt = calls(fake_upstream)[1].json["messages"][-1]["content"]
    assert "did not finish within the time limit and was killed" in prompt
    assert trace(resp)["stopped"] == "approved"
    assert content(resp) == answer
    assert _sandboxes_alive() == []


def test_tool_time_counts_against_the_deadline(fake_upstream: FakeUpstream,
                                               make_proxy: Callable[..., ProxyServer]) -> None:
    proxy = make_proxy(fake_upstream.url, memory=NO_MEMORY)
    answer = tool_answer("import time\ntime.sleep(60)")
    fake_upstream.script(lambda body, i: {"answer": answer, "critique": APPROVE}[kind(body)])
    body = {"model": "fake", "messages": [{"role": "user", "content": QUESTION}],
            "strategy": {"name": "critique_refine", "tools": True, "tool_timeout_s": 30, "deadline_s": 1.5}}
    t0 = time.monotonic()
    r = httpx.post(proxy.url + "/chat/completions", json=body, timeout=20)
    elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text  # the deadline passed while the tool ran: no time left to critique
    assert elapsed < 3.5, elapsed
    assert _sandboxes_alive() == []


# ---- usage, trace, options ----------------------------------------------------------------------


def test_usage_is_the_sum_over_every_call(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    refines = iter(range(1, 100))

    def script(body: dict[str, Any], i: int) -> str:
        k = kind(body)
        if k == "refine":
            return "four five " * next(refines) + "The answer is 42."
        return {"answer": "one two three The answer is 41.", "checklist": CHECKLIST,
                "critique": "- YES\n- NO\nFINAL VERIFICATION ANSWER: False"}[k]

    fake_upstream.script(script)
    resp = ask(client, checklist=True, max_rounds=3)
    assert len(calls(fake_upstream)) == 7  # answer, checklist, 3 critiques, 2 refines
    assert_honest_usage(resp, fake_upstream)
    u = resp["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert [c["purpose"] for c in trace(resp)["calls"]] == [
        "answer", "checklist", "critique", "refine", "critique", "refine", "critique"]
    assert all(c["ok"] for c in trace(resp)["calls"])


def test_trace_options_and_candidates(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda body, i: {"answer": "The answer is 42.", "critique": APPROVE}[kind(body)])
    resp = ask(client, max_rounds=4, critique_max_tokens=100)
    t = trace(resp)
    assert t["options"]["max_rounds"] == 4 and t["options"]["critique_max_tokens"] == 100
    assert calls(fake_upstream)[1].json["max_tokens"] == 100
    assert t["candidates"][0]["verdicts"]["critique"] == {"approved": True, "critique": APPROVE, "score": 1.0}
    assert resp["sharpen"]["strategy"] == "critique_refine"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"max_rounds": 0}, "strategy.max_rounds"),
        ({"max_rounds": 11}, "strategy.max_rounds"),
        ({"tool_timeout_s": 0}, "strategy.tool_timeout_s"),
        ({"critique_max_tokens": 8}, "strategy.critique_max_tokens"),
        ({"rounds": 2}, "strategy.rounds"),
    ],
)
def test_invalid_options_are_400(options: dict[str, Any], param: str, client: openai.OpenAI,
                                 fake_upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, **options)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body.get("param") == param, body
    assert calls(fake_upstream) == []


def test_upstream_failure_is_reported(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda body, i: {"answer": "The answer is 41.", "critique": REJECT}[kind(body)])
    fake_upstream.fault = "400"
    with pytest.raises(openai.BadRequestError):
        ask(client)
    assert len(calls(fake_upstream)) == 1


def test_a_less_sure_refinement_does_not_replace_the_first_draft(client: openai.OpenAI,
                                                                 fake_upstream: FakeUpstream) -> None:
    def script(body: dict[str, Any], i: int) -> str:
        return {"answer": "The answer is 12.", "critique": REJECT, "refine": "The answer is 13."}[kind(body)]

    fake_upstream.script(script)
    # the first draft was sure (every token -0.01), the refinement was not (-2.0)
    fake_upstream.logprob_fn = lambda body, i, j, tok: -2.0 if body["messages"][-1]["role"] == "user" and \
        "Feedback on your answer" in str(body["messages"][-1]["content"]) else -0.01
    resp = ask(client, max_rounds=2)
    assert kinds(fake_upstream) == ["answer", "critique", "refine", "critique"]
    assert content(resp) == "The answer is 12."
    assert trace(resp)["chosen_draft"] == 0
