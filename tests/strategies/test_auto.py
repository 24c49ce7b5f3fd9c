"""auto through the proxy, with the openai SDK against the scripted fake upstream: a probe of
``probe_n`` samples that answers at once when it agrees, else a top-up to ``n`` candidates judged by
best_of_n's verifiers.

The fake answers the probe ("Probe {i}. ...", ``n=probe_n``) and the top-up ("More {i}. ...",
``n=n-probe_n``) differently, so the trace shows which call each candidate came from; verifier
requests are recognised by the verifier system prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)

MESSAGES: list[Any] = [{"role": "user", "content": "What is 3 + 4?"}]
TRUE = "FINAL VERIFICATION ANSWER: True"
FALSE = "FINAL VERIFICATION ANSWER: False"


SHARED_SERVER = True  # one fake and one proxy for the module (tests/conftest.py)


@functools.cache
def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=20)


def ask(proxy: ProxyServer, strategy: dict[str, Any], **kw: Any) -> dict[str, Any]:
    r = _client(proxy.url).chat.completions.create(
        model="fake", messages=MESSAGES, extra_body={"strategy": {"name": "auto", "pal": 0, **strategy}, "trace": True},
        **kw)
    out: dict[str, Any] = r.model_dump()
    return out


def is_verifier(body: dict[str, Any]) -> bool:
    msgs = body.get("messages") or []
    return bool(msgs) and "strict verifier" in str(msgs[0].get("content"))


def script(probe: list[str], more: list[str] | None = None, *, probe_n: int | None = None,
           verdict: Callable[[str], str] = lambda text: TRUE) -> Callable[[dict[str, Any], int], str]:
    """Candidates: the probe call (n == probe_n) says ``probe``, any other call ``more``."""
    size = len(probe) if probe_n is None else probe_n

    def fn(body: dict[str, Any], i: int) -> str:
        if is_verifier(body):
            return verdict(str(body["messages"][-1]["content"]))
        if body.get("n") == size:
            return f"Probe {i}. The answer is {probe[i]}."
        assert more is not None, body
        return f"More {i}. The answer is {more[i]}."

    return fn


def candidate_calls(fake: FakeUpstream) -> list[RecordedRequest]:
    return [r for r in fake.completion_calls() if not is_verifier(r.json)]


def verifier_calls(fake: FakeUpstream) -> list[RecordedRequest]:
    return [r for r in fake.completion_calls() if is_verifier(r.json)]


def usage_of(resp: dict[str, Any]) -> dict[str, int]:
    return {k: resp["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def content(resp: dict[str, Any], i: int = 0) -> str:
    return str(resp["choices"][i]["message"]["content"])


def test_unanimous_probe_answers_with_one_call(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(script(["7", "7", "7"]))
    resp = ask(proxy, {"probe_n": 3, "n": 8})
    (call,) = fake_upstream.completion_calls()
    assert call.json["n"] == 3
    assert call.json["messages"] == MESSAGES
    assert content(resp) in {f"Probe {i}. The answer is 7." for i in range(3)}
    assert usage_of(resp) == fake_upstream.total_usage() == call.usage
    s = resp["sharpen"]
    assert s["strategy"] == "auto" and s["upstream_calls"] == 1 and s["uncertainty"] == 0.0
    t = s["trace"]
    assert t["escalated"] is False
    assert t["probe_answer"] == "7" and t["probe_agreement"] == 1.0 and t["probe_n"] == 3
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [("candidates", 3)]
    assert len(t["candidates"]) == 3
    assert resp["choices"][0]["logprobs"] is None  # asked for internally, not by the client


def test_default_options_probe_three(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(script(["5", "5", "5"]))
    resp = ask(proxy, {})
    assert [c.json["n"] for c in fake_upstream.completion_calls()] == [3]
    assert content(resp).endswith("The answer is 5.")


def test_disagreeing_probe_escalates_and_judges_the_merged_candidates(fake_upstream: FakeUpstream,
                                                                      proxy: ProxyServer) -> None:
    # only "More 1." (a top-up candidate, index 3 + 1 = 4 once merged) is approved: it must win
    # even though it is in the minority, which it can only do if the merged indices line up
    fake_upstream.script(script(["7", "7", "3"], ["7", "9", "7", "7", "7"],
                                verdict=lambda text: TRUE if "More 1." in text else FALSE))
    resp = ask(proxy, {"probe_n": 3, "n": 8, "verifiers": ["approval", "agreement"]})
    cands = candidate_calls(fake_upstream)
    assert [c.json["n"] for c in cands] == [3, 5]
    assert cands[0].json["messages"] == cands[1].json["messages"] == MESSAGES
    assert content(resp) == "More 1. The answer is 9."

    t = resp["sharpen"]["trace"]
    texts = [f"Probe {i}. The answer is {a}." for i, a in enumerate(["7", "7", "3"])]
    texts += [f"More {i}. The answer is {a}." for i, a in enumerate(["7", "9", "7", "7", "7"])]
    assert [c["index"] for c in t["candidates"]] == list(range(8))
    assert [c["content"] for c in t["candidates"]] == texts
    assert content(resp) in [c["content"] for c in t["candidates"]]
    assert [c["verdicts"]["aspect:approval"]["approved"] for c in t["candidates"]] == [False] * 4 + [True] + [False] * 3
    assert [c["scores"]["agreement"] for c in t["candidates"]] == pytest.approx(
        [6 / 8, 6 / 8, 1 / 8, 6 / 8, 1 / 8, 6 / 8, 6 / 8, 6 / 8])
    # every merged candidate was verified once
    vcalls = verifier_calls(fake_upstream)
    assert len(vcalls) == 8
    for text in texts:
        assert sum(text in v.json["messages"][-1]["content"] for v in vcalls) == 1

    assert t["escalated"] is True
    assert t["probe_answer"] == "7" and t["probe_agreement"] == pytest.approx(2 / 3)
    assert t["verifiers"] == ["aspect:approval", "agreement"]
    assert [c["purpose"] for c in t["calls"][:2]] == ["candidates", "candidates:wave2"]
    assert [c["n"] for c in t["calls"][:2]] == [3, 5]
    assert {c["purpose"] for c in t["calls"][2:]} == {"verify:approval"}
    assert resp["sharpen"]["upstream_calls"] == len(fake_upstream.completion_calls()) == 2 + 8
    assert usage_of(resp) == fake_upstream.total_usage()
    assert sum(c["usage"]["total_tokens"] for c in t["calls"]) == resp["usage"]["total_tokens"]


def test_escalation_with_all_approving_takes_the_merged_majority(fake_upstream: FakeUpstream,
                                                                 proxy: ProxyServer) -> None:
    fake_upstream.script(script(["4", "9", "9"], ["4", "4", "4", "4"]))
    resp = ask(proxy, {"probe_n": 3, "n": 7, "verifiers": ["approval", "agreement"]})
    assert content(resp).endswith("The answer is 4.")  # 5 of 7 once merged, though the probe said 9
    assert resp["sharpen"]["trace"]["probe_answer"] == "9"
    assert resp["sharpen"]["trace"]["uncertainty"]["agreement"] == pytest.approx(5 / 7)
    assert usage_of(resp) == fake_upstream.total_usage()


def test_lower_threshold_answers_from_a_majority(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(script(["7", "3", "7"]))
    resp = ask(proxy, {"probe_n": 3, "n": 8, "agree_threshold": 0.6})
    assert len(fake_upstream.completion_calls()) == 1
    assert content(resp) in {"Probe 0. The answer is 7.", "Probe 2. The answer is 7."}
    assert resp["sharpen"]["trace"]["escalated"] is False
    assert resp["sharpen"]["uncertainty"] == pytest.approx(1 / 3, abs=1e-4)


@pytest.mark.parametrize(("logprob", "min_logprob", "escalated"), [
    (-2.0, -1.0, True),    # unanimous but unsure: escalate
    (-0.1, -1.0, False),
    (-2.0, None, False),   # no gate: agreement alone decides
])
def test_min_logprob_gates_the_probe(fake_upstream: FakeUpstream, proxy: ProxyServer, logprob: float,
                                     min_logprob: float | None, escalated: bool) -> None:
    fake_upstream.script(script(["7", "7", "7"], ["7", "7", "7", "7", "7"]))
    fake_upstream.logprob_fn = lambda body, i, j, tok: logprob
    opts: dict[str, Any] = {"probe_n": 3, "n": 8, "verifiers": ["agreement"]}
    if min_logprob is not None:
        opts["min_logprob"] = min_logprob
    resp = ask(proxy, opts)
    t = resp["sharpen"]["trace"]
    assert t["escalated"] is escalated
    assert t["probe_mean_logprob"] == pytest.approx(logprob)
    assert t["probe_agreement"] == 1.0
    assert [c.json["n"] for c in candidate_calls(fake_upstream)] == ([3, 5] if escalated else [3])
    assert usage_of(resp) == fake_upstream.total_usage()


def test_client_n_is_served_after_escalation(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(script(["7", "3", "5"], ["7"]))
    resp = ask(proxy, {"probe_n": 3, "n": 4, "verifiers": ["agreement"]}, n=2)
    assert [c.json["n"] for c in candidate_calls(fake_upstream)] == [3, 1]
    assert [c["index"] for c in resp["choices"]] == [0, 1]
    assert content(resp, 0).endswith("The answer is 7.")
    assert content(resp, 1) != content(resp, 0)


def test_probe_n_equal_to_n_judges_the_probe_alone(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(script(["7", "3", "3"], verdict=lambda text: TRUE if "Probe 0." in text else FALSE))
    resp = ask(proxy, {"probe_n": 3, "n": 3, "verifiers": ["approval"]})
    assert [c.json["n"] for c in candidate_calls(fake_upstream)] == [3]
    assert len(verifier_calls(fake_upstream)) == 3
    assert content(resp) == "Probe 0. The answer is 7."
    assert resp["sharpen"]["trace"]["escalated"] is True


@pytest.mark.parametrize(("options", "kw", "param"), [
    ({"probe_n": 5, "n": 4}, {}, "strategy.probe_n"),
    ({"n": 1}, {}, "strategy.n"),
    ({"agree_threshold": 1.5}, {}, "strategy.agree_threshold"),
    ({"probe_n": 0}, {}, "strategy.probe_n"),
    ({"verifiers": ["nope"]}, {}, "strategy.verifiers"),
    ({"pal_more": -1}, {}, "strategy.pal_more"),
    ({"probe_n": 3, "n": 8}, {"n": 4}, "n"),  # more choices than a confident probe holds
])
def test_invalid_options_are_400_before_any_call(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                  options: dict[str, Any], kw: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(proxy, options, **kw)
    assert err.value.body["param"] == param  # type: ignore[index]
    assert fake_upstream.completion_calls() == []


def test_escalation_in_waves_stops_once_settled(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    # the probe splits (7, 7, 3); the next waves all say 7: after one wave of 2, five 7s against one 3
    # give P(7 leads) = 0.9375 < 0.95; after the next, six against one give 0.965: stop at 7 of 12
    fake_upstream.script(script(["7", "7", "3"], ["7", "7"]))
    resp = ask(proxy, {"probe_n": 3, "n": 12, "verifiers": ["confidence"], "wave": 2, "stop_threshold": 0.95})
    t = resp["sharpen"]["trace"]
    assert [c.json["n"] for c in candidate_calls(fake_upstream)] == [3, 2, 2]
    assert [w["total"] for w in t["waves"]] == [3, 5, 7] and t["stopped_early"] is True
    assert content(resp).endswith("The answer is 7.")
    assert usage_of(resp) == fake_upstream.total_usage()


def programs(printed: list[str | None], prose: list[str] | None = None,
             more: list[str | None] | None = None) -> Callable[[dict[str, Any], int], str]:
    """Program-aided calls: in the first, program i prints ``printed[i]`` (None: a reply with no
    code), in a second ``more[i]``; prose calls say ``prose[i]``."""
    pal_calls = 0

    def fn(body: dict[str, Any], i: int) -> str:
        nonlocal pal_calls
        if "Python program" in str(body["messages"][-1]["content"]):
            pal_calls += i == 0  # the fake asks for a call's choices in order
            wave = printed if pal_calls == 1 else more
            assert wave is not None, "an unexpected second wave of programs"
            p = wave[i]
            return "I cannot write code." if p is None else f"```python\nprint({p})\n```"
        assert prose is not None, body
        return f"Prose {i}. The answer is {prose[i]}."

    return fn


def ask_auto(proxy: ProxyServer, strategy: dict[str, Any], **kw: Any) -> dict[str, Any]:
    r = _client(proxy.url).chat.completions.create(
        model="fake", messages=MESSAGES, extra_body={"strategy": {"name": "auto", **strategy}, "trace": True}, **kw)
    out: dict[str, Any] = r.model_dump()
    return out


def test_agreeing_programs_answer_with_one_call(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(programs(["3 + 4", "7"]))
    resp = ask_auto(proxy, {})
    t = resp["sharpen"]["trace"]
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [("candidates:pal", 2)]
    assert t["probe"] == "programs" and t["escalated"] is False and t["probe_answer"] == "7"
    assert content(resp).endswith("The answer is 7.") and "print(" in content(resp)
    assert resp["sharpen"]["uncertainty"] == 0.0
    assert usage_of(resp) == fake_upstream.total_usage()


def test_one_program_that_ran_settles_with_less_certainty(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(programs([None, "7"]))
    resp = ask_auto(proxy, {})
    t = resp["sharpen"]["trace"]
    assert t["escalated"] is False and t["probe_agreement"] == 0.5
    assert content(resp).endswith("The answer is 7.")  # the program that ran, not the one that abstained
    assert resp["sharpen"]["uncertainty"] == 0.5


@pytest.mark.parametrize("printed", [["7", "8"], [None, None]])
def test_unsettled_programs_escalate_to_the_prose_and_one_vote(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                               printed: list[str | None]) -> None:
    fake_upstream.script(programs(printed, ["7", "7", "5", "7", "6", "7"]))
    resp = ask_auto(proxy, {"n": 8, "pal_more": 0})  # two abstentions draw no second wave anyway
    t = resp["sharpen"]["trace"]
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [("candidates:pal", 2), ("candidates", 6)]
    assert t["probe"] == "programs" and t["escalated"] is True
    assert len(t["candidates"]) == 8
    assert content(resp).endswith("The answer is 7.")
    assert usage_of(resp) == fake_upstream.total_usage()


def test_escalated_indices_line_up(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    # the programs disagree (9 vs 8); one prose reply says 8: the vote is 8, and the reply returned
    # must be a candidate that says 8 (a misaligned merge would return another's text)
    fake_upstream.script(programs(["9", "8"], ["8", "5"]))
    resp = ask_auto(proxy, {"n": 4, "pal_more": 0})
    assert content(resp).endswith("The answer is 8.")
    assert len(resp["sharpen"]["trace"]["candidates"]) == 4


def test_disagreeing_programs_draw_a_second_wave_that_settles(fake_upstream: FakeUpstream,
                                                               proxy: ProxyServer) -> None:
    fake_upstream.script(programs(["7", "8"], more=[None, "7"]))
    resp = ask_auto(proxy, {})
    t = resp["sharpen"]["trace"]
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [("candidates:pal", 2), ("candidates:pal", 2)]
    assert t["escalated"] is False and t["probe_answer"] == "7"
    assert t["probe_n"] == 4 and t["probe_waves"] == 2 and t["probe_agreement"] == 0.5
    assert content(resp).endswith("The answer is 7.")
    assert resp["sharpen"]["uncertainty"] == 0.5
    assert usage_of(resp) == fake_upstream.total_usage()


@pytest.mark.parametrize("more", [["9", "8"], [None, None], ["6", "4"]])
def test_a_second_wave_without_a_leader_of_two_escalates(fake_upstream: FakeUpstream, proxy: ProxyServer,
                                                         more: list[str | None]) -> None:
    # a 2-2 tie, no new votes, or four different answers: none settled, so prose joins the vote
    fake_upstream.script(programs(["9", "8"], ["8", "5"], more=more))
    resp = ask_auto(proxy, {"n": 6})
    t = resp["sharpen"]["trace"]
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [
        ("candidates:pal", 2), ("candidates:pal", 2), ("candidates", 2)]
    assert t["escalated"] is True and t["probe_n"] == 4 and len(t["candidates"]) == 6
    # 8 leads every one of these votes; the reply returned must be one that says 8 (indices
    # misaligned across the three calls would return another candidate's text)
    assert content(resp).endswith("The answer is 8.")
    assert usage_of(resp) == fake_upstream.total_usage()


def test_the_second_wave_never_draws_past_n(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(programs(["7", "8"], more=["7"]))
    resp = ask_auto(proxy, {"n": 3})
    t = resp["sharpen"]["trace"]
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [("candidates:pal", 2), ("candidates:pal", 1)]
    assert t["escalated"] is False and content(resp).endswith("The answer is 7.")


def test_more_choices_than_programs_probe_with_prose(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(programs(["7", "7"], ["7", "7", "7"]))
    resp = ask_auto(proxy, {"probe_n": 3}, n=3)
    t = resp["sharpen"]["trace"]
    assert t["probe"] == "prose" and t["escalated"] is False
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [("candidates", 3)]
    assert len(resp["choices"]) == 3


def test_json_requests_probe_with_prose_and_draw_no_programs(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(programs(["7", "7"], ['{"a": 1}', '{"a": 2}', '{"a": 3}', '{"a": 4}']))
    resp = ask_auto(proxy, {"probe_n": 2, "n": 4}, response_format={"type": "json_object"})
    t = resp["sharpen"]["trace"]
    assert t["probe"] == "prose"
    assert all(c["purpose"] != "candidates:pal" for c in t["calls"])


def test_pal_above_n_is_a_400(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask_auto(proxy, {"pal": 5, "n": 4})
    assert err.value.body["param"] == "strategy.pal"  # type: ignore[index]
    assert fake_upstream.completion_calls() == []
