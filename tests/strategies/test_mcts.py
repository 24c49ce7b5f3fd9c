"""Monte Carlo tree search over reasoning steps (strategies/mcts.py) through sharpen's HTTP API,
against the scripted fake upstream: one n=k call per expansion, the tree, merging of steps,
rewards, limits, budgets and deadlines, failures, the finishing call, and streaming."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
NO_MEMORY = {"enabled": False}  # experience memory off: its distil calls reach the fake after the response

Script = Callable[[dict[str, Any], int], str]


def kind(body: dict[str, Any]) -> str:
    """Which of mcts's prompts this upstream request is."""
    last = str(body["messages"][-1]["content"])
    if "Is this reasoning correct so far?" in last or "Is every step above correct?" in last:
        return "reward"
    if "Finish the solution" in last:
        return "finish"
    return "expand"


def steps_so_far(body: dict[str, Any]) -> list[str]:
    """The steps an expansion (or finish) request continues from."""
    last = str(body["messages"][-1]["content"])
    if not last.startswith("Steps so far:\n"):
        return []
    return last.removeprefix("Steps so far:\n").rsplit("\n", 1)[0].splitlines()


def expanding(fn: Callable[[dict[str, Any], int], str], reward: Script | None = None,
              finish: str = "The answer is 7.") -> Script:
    """A script that answers expansions with ``fn`` and the other prompts sensibly."""

    def script(body: dict[str, Any], i: int) -> str:
        k = kind(body)
        if k == "expand":
            return fn(body, i)
        if k == "reward":
            return reward(body, i) if reward else "FINAL VERIFICATION ANSWER: True"
        return finish

    return script


@pytest.fixture
def proxy(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return make_proxy(fake_upstream.url, memory=NO_MEMORY)


@pytest.fixture
def client(proxy: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def ask(client: openai.OpenAI, **options: Any) -> dict[str, Any]:
    resp = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": QUESTION}],
        extra_body={"strategy": {"name": "mcts", **options}, "trace": True},
    )
    return resp.model_dump()


def post(proxy: ProxyServer, **options: Any) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": QUESTION}],
            "strategy": {"name": "mcts", **options}, "trace": True}
    return httpx.post(proxy.url + "/chat/completions", json=body, timeout=20)


def calls(fake: FakeUpstream, which: str | None = None) -> list[RecordedRequest]:
    return [r for r in fake.completion_calls() if which is None or kind(r.json) == which]


def content(resp: dict[str, Any]) -> str:
    return str(resp["choices"][0]["message"]["content"])


def trace(resp: dict[str, Any]) -> dict[str, Any]:
    return resp["sharpen"]["trace"]  # type: ignore[no-any-return]


def nodes(tree: dict[str, Any], depth: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    yield depth, tree
    for c in tree["children"]:
        yield from nodes(c, depth + 1)


def check_tree(tree: dict[str, Any]) -> None:
    """Visits add up (every visit of a child passed through its parent), values are rewards."""
    for _, n in nodes(tree):
        assert n["visits"] >= sum(c["visits"] for c in n["children"])
        assert 0.0 <= n["value"] <= 1.0
        assert isinstance(n["id"], int) and isinstance(n["step"], str)


def assert_honest_usage(resp: dict[str, Any], fake: FakeUpstream) -> None:
    total = fake.total_usage()
    assert total["total_tokens"] > 0
    assert {k: resp["usage"][k] for k in total} == total
    per_call = trace(resp)["calls"]
    for key in total:
        assert sum(c["usage"][key] for c in per_call) == total[key]


# ---- expansions and the tree --------------------------------------------------------------------

THREE_PATHS = [
    "Step 1: Tom starts with 3 apples.\nStep 2: He buys 4 more, so 3 + 4 = 7.\nThe answer is 7.",
    "Step 1: Tom has 3 apples at first.\nStep 2: Adding 4 gives 7 apples.\nThe answer is 7.",
    "Step 1: Tom starts with 3 apples.\nStep 2: He buys 4 more, so 3 + 4 = 8.\nThe answer is 8.",
]


def test_one_expansion_is_one_call_with_n_k(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(expanding(lambda body, i: THREE_PATHS[i % 3]))
    resp = ask(client, k=3, iterations=3, step_tokens=64, temperature=0.5)
    expands = calls(fake_upstream, "expand")
    # every path of the first expansion ends in an answer: nothing is left to expand
    assert len(expands) == 1 and len(calls(fake_upstream)) == 1
    body = expands[0].json
    assert body["n"] == 3 and body["max_tokens"] == 64 and body["temperature"] == 0.5
    assert body["messages"][0]["role"] == "system" and "step by step" in body["messages"][0]["content"]
    assert body["messages"][1:] == [{"role": "user", "content": QUESTION}]
    t = trace(resp)
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [("expand", 3)]
    tree = t["tree"]
    check_tree(tree)
    assert tree["visits"] == 3  # three new leaves, each backpropagated once
    # "Step 1: Tom starts with 3 apples." is shared by paths 0 and 2: one node, two children
    steps1 = {c["step"]: c for c in tree["children"]}
    assert set(steps1) == {"Step 1: Tom starts with 3 apples.", "Step 1: Tom has 3 apples at first."}
    shared = steps1["Step 1: Tom starts with 3 apples."]
    assert shared["visits"] == 2 and len(shared["children"]) == 2
    answers = sorted(n["answer"] for _, n in nodes(tree) if n["answer"] is not None)
    assert answers == ["7", "7", "8"]
    assert t["nodes"] == sum(1 for _ in nodes(tree))
    # self-consistency: 7 has two votes of three
    assert content(resp).endswith("The answer is 7.")
    assert content(resp).startswith("Step 1:")
    assert resp["sharpen"]["uncertainty"] == pytest.approx(1 / 3, abs=1e-3)
    assert_honest_usage(resp, fake_upstream)


def test_every_expansion_asks_for_k_and_continues_the_path(client: openai.OpenAI,
                                                          fake_upstream: FakeUpstream) -> None:
    def expand(body: dict[str, Any], i: int) -> str:
        depth = len(steps_so_far(body))
        if depth >= 2:
            return f"Step {depth + 1}: so the total is {7 + i}.\nThe answer is {7 + i}."
        return f"Step {depth + 1}: partial result {10 * depth + i}."

    fake_upstream.script(expanding(expand))
    resp = ask(client, k=2, iterations=4, parallel=2)
    expands = calls(fake_upstream, "expand")
    assert 2 <= len(expands) <= 4 * 2
    assert all(r.json["n"] == 2 for r in expands)
    # a continuation shows the steps of its own path, in order
    for r in expands:
        steps = steps_so_far(r.json)
        assert [s.split(":")[0] for s in steps] == [f"Step {j + 1}" for j in range(len(steps))]
    t = trace(resp)
    check_tree(t["tree"])
    assert all(c["purpose"] == "expand" for c in t["calls"])
    assert re.search(r"The answer is (7|8)\.$", content(resp))
    assert_honest_usage(resp, fake_upstream)


def test_parallel_leaves_expand_concurrently(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    # the root's expansion leaves two open steps; the next iteration expands both at once
    def expand(body: dict[str, Any], i: int) -> str:
        steps = steps_so_far(body)
        if not steps:
            return ["Step 1: count the first 3 apples.", "Step 1: count the 4 new apples."][i]
        return f"Step 2: total {7 + i}.\nThe answer is {7 + i}."

    fake_upstream.script(expanding(expand))
    fake_upstream.ttft = 0.3
    resp = ask(client, k=2, iterations=2, parallel=2)
    expands = calls(fake_upstream, "expand")
    assert len(expands) == 3
    continued = sorted(steps_so_far(r.json)[0] for r in expands[1:])
    assert continued == ["Step 1: count the 4 new apples.", "Step 1: count the first 3 apples."]
    # the two continuations overlapped in time: sent together, one n=k call each
    a, b = expands[1], expands[2]
    assert abs(a.time - b.time) < 0.25
    check_tree(trace(resp)["tree"])


# ---- merging ------------------------------------------------------------------------------------


def test_near_duplicate_steps_merge_but_different_numbers_do_not(client: openai.OpenAI,
                                                                 fake_upstream: FakeUpstream) -> None:
    paths = [
        "Step 1: Add 3 and 4 to get 7.\nThe answer is 7.",
        "Step 1: Add 3 and 4 to get 7\nThe answer is 7.",  # no full stop: the same step
        "Step 1: add 3 and 4 to get 7.\nThe answer is 7.",  # case: the same step
        "Step 1: Add 3 and 5 to get 8.\nThe answer is 8.",  # other numbers: a different step
        "Step 1: Add 3 and 4 to get 9.\nThe answer is 9.",  # one number differs: different
    ]
    fake_upstream.script(expanding(lambda body, i: paths[i]))
    resp = ask(client, k=5, iterations=1)
    tree = trace(resp)["tree"]
    check_tree(tree)
    children = {c["step"]: c for c in tree["children"]}
    assert set(children) == {"Step 1: Add 3 and 4 to get 7.", "Step 1: Add 3 and 5 to get 8.",
                             "Step 1: Add 3 and 4 to get 9."}
    merged = children["Step 1: Add 3 and 4 to get 7."]
    assert merged["visits"] == 3
    assert [c["step"] for c in merged["children"]] == ["The answer is 7."]
    assert merged["children"][0]["visits"] == 3  # the same final step, three times the evidence
    assert children["Step 1: Add 3 and 5 to get 8."]["visits"] == 1
    assert content(resp) == "Step 1: Add 3 and 4 to get 7.\nThe answer is 7."
    assert trace(resp)["uncertainty"]["agreement"] == pytest.approx(0.6)


def test_merge_threshold_is_an_option(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    paths = ["Step 1: Add 3 and 4 to get 7.\nThe answer is 7.", "Step 1: Add 3 and 4 to get 7\nThe answer is 7."]
    fake_upstream.script(expanding(lambda body, i: paths[i]))
    resp = ask(client, k=2, iterations=1, merge_similarity=1.0)
    assert len(trace(resp)["tree"]["children"]) == 2  # only identical steps merge


# ---- rewards ------------------------------------------------------------------------------------


def test_self_consistency_picks_the_majority_answer(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    answers = [9, 7, 9, 7, 7]
    fake_upstream.script(expanding(lambda body, i: f"Step 1: route number {i} gives {answers[i]}.\n"
                                                  f"The answer is {answers[i]}."))
    resp = ask(client, k=5, iterations=1, reward="self_consistency")
    assert content(resp).endswith("The answer is 7.")
    assert calls(fake_upstream, "reward") == []
    t = trace(resp)
    assert t["uncertainty"]["agreement"] == pytest.approx(0.6)
    assert resp["sharpen"]["uncertainty"] == pytest.approx(0.4)
    values = {c["answer"]: c["scores"]["value"] for c in t["candidates"]}
    assert values == {"7": pytest.approx(0.6), "9": pytest.approx(0.4)}


def test_verifier_reward_makes_reward_calls_and_uses_their_verdict(client: openai.OpenAI,
                                                                  fake_upstream: FakeUpstream) -> None:
    answers = [9, 9, 7]  # the majority is wrong; the verifier approves only 7

    def reward(body: dict[str, Any], i: int) -> str:
        ok = "The answer is 7." in body["messages"][-1]["content"]
        return f"Checked.\nFINAL VERIFICATION ANSWER: {ok}"

    fake_upstream.script(expanding(lambda body, i: f"Step 1: way {i} to {answers[i]}.\nThe answer is {answers[i]}.",
                                   reward=reward))
    resp = ask(client, k=3, iterations=1, reward="verifier")
    rewards = calls(fake_upstream, "reward")
    assert len(rewards) == 3  # one per new leaf
    for r in rewards:
        prompt = r.json["messages"][-1]["content"]
        assert prompt.startswith(f"Question:\n{QUESTION}\n\nSteps:\nStep 1: way ")
        assert r.json["logprobs"] is True and r.json["max_tokens"] == 16 and "n" not in r.json
    assert content(resp) == "Step 1: way 2 to 7.\nThe answer is 7."
    values = {c["answer"]: c["scores"]["value"] for c in trace(resp)["candidates"]}
    assert values == {"7": 1.0, "9": 0.0}
    assert [c["purpose"] for c in trace(resp)["calls"]] == ["expand", "reward", "reward", "reward"]
    assert_honest_usage(resp, fake_upstream)


def test_verifier_reward_scores_partial_paths(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    def expand(body: dict[str, Any], i: int) -> str:
        if not steps_so_far(body):
            return ["Step 1: good start with 3 + 4.", "Step 1: bad start with 3 - 4."][i]
        good = "good" in steps_so_far(body)[0]
        return "Step 2: so 7.\nThe answer is 7." if good else "Step 2: so -1.\nThe answer is -1."

    def reward(body: dict[str, Any], i: int) -> str:
        return f"FINAL VERIFICATION ANSWER: {'bad start' not in body['messages'][-1]['content']}"

    fake_upstream.script(expanding(expand, reward=reward))
    resp = ask(client, k=2, iterations=2, parallel=1, reward="verifier")
    expands = calls(fake_upstream, "expand")
    assert len(expands) == 2
    # UCT followed the approved step: the second expansion continues the good path
    assert steps_so_far(expands[1].json) == ["Step 1: good start with 3 + 4."]
    assert content(resp).endswith("The answer is 7.")


def test_logprob_reward(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    answers = [9, 7]

    def reward(body: dict[str, Any], i: int) -> str:
        return "Yes" if "The answer is 7." in body["messages"][-1]["content"] else "No"

    fake_upstream.script(expanding(lambda body, i: f"Step 1: via {i}.\nThe answer is {answers[i]}.", reward=reward))
    resp = ask(client, k=2, iterations=1, reward="logprob")
    rewards = calls(fake_upstream, "reward")
    assert len(rewards) == 2
    assert all("Answer with only Yes or No." in r.json["messages"][-1]["content"] for r in rewards)
    assert content(resp).endswith("The answer is 7.")


# ---- limits -------------------------------------------------------------------------------------


def one_step_at_a_time(body: dict[str, Any], i: int) -> str:
    depth = len(steps_so_far(body))
    return f"Step {depth + 1}: work out part {depth + 1} of it."


def test_depth_limit(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(expanding(one_step_at_a_time))
    resp = ask(client, k=1, parallel=1, iterations=10, max_depth=3)
    # steps at depths 1, 2, 3; a step at the limit is never expanded
    assert len(calls(fake_upstream, "expand")) == 3
    assert len(calls(fake_upstream, "finish")) == 1
    tree = trace(resp)["tree"]
    depths = [d for d, n in nodes(tree) if n["answer"] is None and n["step"].startswith("Step")]
    assert max(depths) == 3


def test_depth_limit_truncates_long_generations(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    long = "\n".join(f"Step {j}: thing {j}." for j in range(1, 7)) + "\nThe answer is 7."
    fake_upstream.script(expanding(lambda body, i: long, finish="So the answer is 7."))
    resp = ask(client, k=1, parallel=1, iterations=5, max_depth=2)
    tree = trace(resp)["tree"]
    chain = [n["step"] for d, n in nodes(tree) if 0 < d <= 2]
    assert chain == ["Step 1: thing 1.", "Step 2: thing 2."]
    # the answer past the limit was cut off, so the path is finished by one more call
    assert len(calls(fake_upstream, "expand")) == 1
    fin = calls(fake_upstream, "finish")
    assert len(fin) == 1
    assert steps_so_far(fin[0].json) == ["Step 1: thing 1.", "Step 2: thing 2."]
    assert content(resp) == "Step 1: thing 1.\nStep 2: thing 2.\nSo the answer is 7."


def test_iteration_limit_and_the_finish_call(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(expanding(one_step_at_a_time, finish="Step 3: add them.\nThe answer is 7."))
    resp = ask(client, k=1, parallel=1, iterations=2, max_depth=8, step_tokens=32)
    assert len(calls(fake_upstream, "expand")) == 2
    fin = calls(fake_upstream, "finish")
    assert len(fin) == 1
    # the finishing call continues the most promising path and asks for the answer line
    assert steps_so_far(fin[0].json) == ["Step 1: work out part 1 of it.", "Step 2: work out part 2 of it."]
    assert "The answer is X." in fin[0].json["messages"][-1]["content"]
    assert fin[0].json["temperature"] == 0.0 and fin[0].json["max_tokens"] == 64
    assert content(resp) == ("Step 1: work out part 1 of it.\nStep 2: work out part 2 of it.\n"
                             "Step 3: add them.\nThe answer is 7.")
    t = trace(resp)
    assert any("no complete path" in n for n in t["notes"])
    assert [c["purpose"] for c in t["calls"]] == ["expand", "expand", "finish"]
    assert_honest_usage(resp, fake_upstream)


# ---- budgets, deadlines, failures ---------------------------------------------------------------

MIXED = ["Step 1: 3 + 4 = 7.\nThe answer is 7.", "Step 1: start from 3 apples."]


def mixed_then(fake: FakeUpstream, after_first: Callable[[], None]) -> Script:
    """The first expansion gives one answer and one open path, then ``after_first`` runs."""
    seen = {"expand": 0}

    def expand(body: dict[str, Any], i: int) -> str:
        if not steps_so_far(body):
            if i == 0:
                seen["expand"] += 1
                if seen["expand"] == 1:
                    after_first()
            return MIXED[i]
        return f"Step {len(steps_so_far(body)) + 1}: more work {i}."

    return expanding(expand)


def test_token_budget_stops_the_search(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(mixed_then(fake_upstream, lambda: None))
    resp = ask(client, k=2, iterations=20, max_upstream_tokens=20)
    assert len(calls(fake_upstream, "expand")) == 1
    t = trace(resp)
    assert any("token budget" in n for n in t["notes"])
    assert content(resp) == "Step 1: 3 + 4 = 7.\nThe answer is 7."
    assert_honest_usage(resp, fake_upstream)


def test_deadline_stops_the_search(proxy: ProxyServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(mixed_then(fake_upstream, lambda: None))
    fake_upstream.ttft = 0.4
    t0 = time.monotonic()
    r = post(proxy, k=2, parallel=1, iterations=30, deadline_s=1.5)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert elapsed < 3.0
    resp = r.json()
    assert 1 <= len(calls(fake_upstream, "expand")) < 30
    assert trace(resp)["notes"]  # says why it stopped
    assert content(resp) == "Step 1: 3 + 4 = 7.\nThe answer is 7."


def test_hanging_upstream_ends_by_the_deadline_with_504(proxy: ProxyServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fault = "hang"
    t0 = time.monotonic()
    r = post(proxy, k=2, iterations=5, deadline_s=1.0)
    elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert 0.9 <= elapsed < 2.5
    assert r.json()["error"]["message"]
    # the abandoned upstream call was cancelled, not left running
    assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 0, timeout=5)


def test_hang_after_the_first_iteration_answers_by_the_deadline(proxy: ProxyServer,
                                                                fake_upstream: FakeUpstream) -> None:
    def hang() -> None:
        fake_upstream.fault = "hang"

    fake_upstream.script(mixed_then(fake_upstream, hang))
    t0 = time.monotonic()
    r = post(proxy, k=2, iterations=5, deadline_s=1.0)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert elapsed < 2.5
    resp = r.json()
    assert content(resp) == "Step 1: 3 + 4 = 7.\nThe answer is 7."
    assert any("search stopped" in n or "stopped early" in n for n in trace(resp)["notes"])
    calls_ = trace(resp)["calls"]
    assert calls_[0]["ok"] and calls_[1]["error"] == "deadline"


def test_expansion_failure_after_the_first_iteration_keeps_the_partial_tree(
        client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    def fail() -> None:
        fake_upstream.fault = "500"

    fake_upstream.script(mixed_then(fake_upstream, fail))
    resp = ask(client, k=2, iterations=5)
    assert content(resp) == "Step 1: 3 + 4 = 7.\nThe answer is 7."
    t = trace(resp)
    assert any(n.startswith("expansion failed, search stopped") for n in t["notes"])
    tree = t["tree"]
    assert {c["step"] for c in tree["children"]} == {"Step 1: 3 + 4 = 7.", "Step 1: start from 3 apples."}
    assert [(c["purpose"], c["ok"]) for c in t["calls"]] == [("expand", True), ("expand", False)]
    assert_honest_usage(resp, fake_upstream)


def test_first_expansion_failure_is_an_error(proxy: ProxyServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fault = "503"
    r = post(proxy, k=2, iterations=3)
    assert r.status_code == 503
    assert "error" in r.json()


# ---- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "param"),
    [({"k": 0}, "strategy.k"), ({"k": 33}, "strategy.k"), ({"iterations": 0}, "strategy.iterations"),
     ({"max_depth": 0}, "strategy.max_depth"), ({"reward": "vibes"}, "strategy.reward"),
     ({"reward": "verifier", "iterations": 64, "parallel": 16, "k": 16}, "strategy.iterations")],
)
def test_invalid_options_are_400(options: dict[str, Any], param: str, proxy: ProxyServer,
                                 fake_upstream: FakeUpstream) -> None:
    r = post(proxy, **options)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    assert calls(fake_upstream) == []


# ---- streaming ----------------------------------------------------------------------------------


def test_stream_sends_keepalives_then_the_answer(fake_upstream: FakeUpstream,
                                                 make_proxy: Callable[..., ProxyServer]) -> None:
    proxy = make_proxy(fake_upstream.url, memory=NO_MEMORY, strategies={"keepalive_s": 0.05})
    fake_upstream.script(expanding(lambda body, i: THREE_PATHS[i % 3]))
    fake_upstream.ttft = 0.5
    body = {"model": "fake", "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "stream_options": {"include_usage": True}, "strategy": {"name": "mcts", "k": 3, "iterations": 2}}
    raw: list[str] = []
    with httpx.stream("POST", proxy.url + "/chat/completions", json=body, timeout=20) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                raw.append(line)
    first_data = next(i for i, ln in enumerate(raw) if ln.startswith("data:"))
    assert first_data >= 2 and all(ln == ": keep-alive" for ln in raw[:first_data])
    assert raw[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in raw[first_data:-1]]
    text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e["choices"])
    assert text.endswith("The answer is 7.") and text.startswith("Step 1:")
    tail = events[-1]
    total = fake_upstream.total_usage()
    assert tail["choices"] == [] and {k: tail["usage"][k] for k in total} == total
    assert tail["sharpen"]["strategy"] == "mcts"
    expands = calls(fake_upstream, "expand")
    assert len(expands) == 1 and not expands[0].json.get("stream") and expands[0].json["n"] == 3

