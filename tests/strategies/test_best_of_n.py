"""best_of_n (BoN-MAV) through the proxy, with the openai SDK against the scripted fake upstream.

The fake answers candidate requests with "Path {i}. The answer is {answer}." and verifier
requests (recognised by the verifier system prompt) with whatever verdict a test scripts.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from strategies.verifiers.aspect import ASPECTS
from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)


SHARED_SERVER = True  # one fake and one proxy for the module (tests/conftest.py)

MESSAGES: list[Any] = [{"role": "user", "content": "What is 3 + 4?"}]
TRUE = "FINAL VERIFICATION ANSWER: True"
FALSE = "FINAL VERIFICATION ANSWER: False"
DEFAULT_ASPECTS = ["approval", "math_steps", "logic_steps", "rederive"]
ALL_FOUR = [*DEFAULT_ASPECTS, "agreement"]  # the LLM verifiers (no longer the default on a model judging itself)
ERROR_500 = {"error": {"message": "fake verifier failure", "type": "InternalServerError", "code": 500}}


@functools.cache
def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=20)


def ask(proxy: ProxyServer, strategy: dict[str, Any], *, trace: bool = True, **kw: Any) -> dict[str, Any]:
    # pal 0 unless a test asks: these tests are about the verifiers (the default's programs are tested below)
    extra = {"strategy": {"name": "best_of_n", "pal": 0, **strategy}, "trace": trace, **kw.pop("extra_body", {})}
    r = _client(proxy.url).chat.completions.create(model="fake", messages=kw.pop("messages", MESSAGES),
                                                   extra_body=extra, **kw)
    return r.model_dump()


def is_verifier(body: dict[str, Any]) -> bool:
    msgs = body.get("messages") or []
    return bool(msgs) and "strict verifier" in str(msgs[0].get("content"))


def aspect_of(body: dict[str, Any]) -> str:
    user = body["messages"][-1]["content"]
    return next(name for name, text in ASPECTS.items() if text in user)


def candidates_script(answers: list[str], verdict: Callable[[dict[str, Any]], str] = lambda body: TRUE,
                      on_candidates: Callable[[], None] | None = None) -> Callable[[dict[str, Any], int], str]:
    def script(body: dict[str, Any], i: int) -> str:
        if is_verifier(body):
            return verdict(body)
        if i == 0 and on_candidates is not None:
            on_candidates()  # runs before the candidates answer goes out, so before any verifier call
        return f"Path {i}. The answer is {answers[i % len(answers)]}."

    return script


def content(resp: dict[str, Any], i: int = 0) -> str:
    return str(resp["choices"][i]["message"]["content"])


def candidate_calls(fake: FakeUpstream) -> list[RecordedRequest]:
    return [r for r in fake.completion_calls() if not is_verifier(r.json)]


def verifier_calls(fake: FakeUpstream) -> list[RecordedRequest]:
    return [r for r in fake.completion_calls() if is_verifier(r.json)]


def usage_of(resp: dict[str, Any]) -> dict[str, int]:
    return {k: resp["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def test_one_candidates_call_and_usage_over_every_call(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(candidates_script(["3", "7", "7", "7"]))
    resp = ask(proxy, {"n": 4, "verifiers": ALL_FOUR}, trace=False)
    assert content(resp).endswith("The answer is 7.")
    (cand,) = candidate_calls(fake_upstream)
    assert cand.json["n"] == 4
    assert cand.json["messages"] == MESSAGES
    vcalls = verifier_calls(fake_upstream)
    assert len(vcalls) == 4 * len(DEFAULT_ASPECTS)
    assert all(v.json.get("n", 1) == 1 for v in vcalls)
    assert sorted(aspect_of(v.json) for v in vcalls) == sorted(DEFAULT_ASPECTS * 4)
    # every candidate is checked by every aspect
    for k in range(4):
        assert sum(f"Path {k}." in v.json["messages"][-1]["content"] for v in vcalls) == len(DEFAULT_ASPECTS)
    assert usage_of(resp) == fake_upstream.total_usage()
    assert usage_of(resp)["total_tokens"] > cand.usage["total_tokens"]  # type: ignore[index]
    s = resp["sharpen"]
    assert s["strategy"] == "best_of_n"
    assert s["upstream_calls"] == 1 + 4 * len(DEFAULT_ASPECTS)
    assert 0.0 <= s["uncertainty"] <= 1.0
    assert "trace" not in s


def test_trace_has_candidates_verdicts_and_every_call(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(candidates_script(["3", "7", "7", "7"]))
    resp = ask(proxy, {"n": 4, "verifiers": ALL_FOUR})
    t = resp["sharpen"]["trace"]
    assert t["verifiers"] == [f"aspect:{a}" for a in DEFAULT_ASPECTS] + ["agreement"]
    assert t["all_verifiers_failed"] is False
    assert len(t["candidates"]) == 4
    for c in t["candidates"]:
        assert set(c["scores"]) == {"verifiers", "agreement", "quality", "vote_share"}
        assert set(c["verdicts"]) == set(t["verifiers"])
        for name in t["verifiers"]:
            assert set(c["verdicts"][name]) == {"score", "approved", "soft", "detail", "error"}
        assert c["verdicts"]["aspect:approval"]["approved"] is True
        assert c["verdicts"]["aspect:approval"]["soft"] is True
    assert [c["scores"]["agreement"] for c in t["candidates"]] == [0.25, 0.75, 0.75, 0.75]
    # every upstream call is in the trace, with its usage, and they add up to the response's usage
    recorded = fake_upstream.completion_calls()
    assert len(t["calls"]) == len(recorded) == resp["sharpen"]["upstream_calls"]
    assert sorted(str(c["usage"]) for c in t["calls"]) == sorted(str(r.usage) for r in recorded)
    assert {c["purpose"] for c in t["calls"]} == {"candidates"} | {f"verify:{a}" for a in DEFAULT_ASPECTS}
    total = {k: sum(c["usage"][k] for c in t["calls"]) for k in ("prompt_tokens", "completion_tokens")}
    assert total["prompt_tokens"] == resp["usage"]["prompt_tokens"]
    assert total["completion_tokens"] == resp["usage"]["completion_tokens"]
    u = t["uncertainty"]
    assert u["agreement"] == pytest.approx(0.75)
    assert u["score"] == pytest.approx(resp["sharpen"]["uncertainty"], abs=1e-4)
    assert t["options"]["n"] == 4


@pytest.mark.parametrize(("weights", "winner"), [({}, "3"), ({"approval": 3}, "3"), ({"agreement": 10}, "7")])
def test_verifier_rejections_beat_the_majority_when_weights_say_so(
        fake_upstream: FakeUpstream, proxy: ProxyServer, weights: dict[str, float], winner: str) -> None:
    fake_upstream.script(candidates_script(
        ["3", "7", "7", "7"], verdict=lambda body: FALSE if "The answer is 7" in body["messages"][-1]["content"]
        else TRUE))
    resp = ask(proxy, {"n": 4, "verifiers": ["approval", "agreement"], "weights": weights})
    assert content(resp).endswith(f"The answer is {winner}.")
    cands = resp["sharpen"]["trace"]["candidates"]
    assert [c["verdicts"]["aspect:approval"]["approved"] for c in cands] == [True, False, False, False]
    w_app, w_agr = weights.get("approval", 1.0), weights.get("agreement", 1.0)
    assert cands[0]["scores"]["verifiers"] == pytest.approx((w_app * 1.0 + w_agr * 0.25) / (w_app + w_agr))
    assert cands[1]["scores"]["verifiers"] == pytest.approx((w_app * 0.0 + w_agr * 0.75) / (w_app + w_agr))


def test_ties_go_to_agreement_then_mean_logprob(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(candidates_script(["5", "7", "7", "7"]))
    # candidate 0 is the most confident but alone; among the 7s candidate 3 is the most confident
    confidence = {0: -0.01, 3: -0.2}
    fake_upstream.logprob_fn = lambda body, i, j, tok: -1.0 if is_verifier(body) else confidence.get(i, -1.0)
    resp = ask(proxy, {"n": 4, "verifiers": ["approval"]})
    cands = resp["sharpen"]["trace"]["candidates"]
    assert all(c["scores"]["verifiers"] == 1.0 for c in cands)  # a tie on the verifiers
    assert content(resp) == "Path 3. The answer is 7."
    assert cands[0]["logprob"] > cands[3]["logprob"] > cands[1]["logprob"]


def test_client_temperature_zero_is_replaced_and_noted(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(candidates_script(["7"]))
    resp = ask(proxy, {"n": 2, "verifiers": ["agreement"], "temperature": 1.1}, temperature=0)
    assert candidate_calls(fake_upstream)[-1].json["temperature"] == 1.1
    assert any("temperature" in n for n in resp["sharpen"]["trace"]["notes"])
    resp = ask(proxy, {"n": 2, "verifiers": ["agreement"]}, temperature=0.3)
    assert candidate_calls(fake_upstream)[-1].json["temperature"] == 0.3
    assert not any("temperature" in n for n in resp["sharpen"]["trace"]["notes"])
    # verifiers judge greedily whatever the candidates were sampled with
    fake_upstream.clear()
    ask(proxy, {"n": 2, "verifiers": ["approval"]}, temperature=0.3)
    assert all(v.json["temperature"] == 0.0 for v in verifier_calls(fake_upstream))


def test_client_n_returns_the_top_candidates(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(candidates_script(
        ["3", "7", "7", "7"], verdict=lambda body: TRUE if "Path 0." in body["messages"][-1]["content"] else FALSE))
    resp = ask(proxy, {"n": 4, "verifiers": ["approval"]}, n=2)
    assert [c["index"] for c in resp["choices"]] == [0, 1]
    assert content(resp, 0) == "Path 0. The answer is 3."
    assert content(resp, 1).endswith("The answer is 7.")  # then agreement among the rejected ones
    assert candidate_calls(fake_upstream)[0].json["n"] == 4


def test_client_n_above_strategy_n_is_400(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(proxy, {"n": 2}, n=3)
    assert err.value.body["param"] == "n"  # type: ignore[index]
    assert fake_upstream.completion_calls() == []


def test_unparseable_verdict_is_a_rejection(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    def verdict(body: dict[str, Any]) -> str:
        if aspect_of(body) == "approval" and "Path 1." in body["messages"][-1]["content"]:
            return "I am not sure what to say here."
        return TRUE

    fake_upstream.script(candidates_script(["7", "7", "7", "7"], verdict=verdict))
    resp = ask(proxy, {"n": 4, "verifiers": ["approval", "math_steps"]})
    cands = resp["sharpen"]["trace"]["candidates"]
    bad = cands[1]["verdicts"]["aspect:approval"]
    assert bad["approved"] is False and bad["score"] == 0.0 and bad["error"] is None
    assert "unparseable" in bad["detail"]
    assert cands[1]["scores"]["verifiers"] == pytest.approx(0.5)  # counted, as a rejection
    assert all(cands[k]["scores"]["verifiers"] == 1.0 for k in (0, 2, 3))
    assert not content(resp).startswith("Path 1.")
    assert resp["sharpen"]["trace"]["all_verifiers_failed"] is False


def test_failed_verifier_calls_leave_the_remaining_verifiers(fake_upstream: FakeUpstream,
                                                             proxy: ProxyServer) -> None:
    def fail_two() -> None:
        for _ in range(2):
            fake_upstream.push_response(500, ERROR_500)

    fake_upstream.script(candidates_script(["3", "7", "7", "7"], on_candidates=fail_two))
    resp = ask(proxy, {"n": 4, "verifiers": ["approval", "agreement"]})
    t = resp["sharpen"]["trace"]
    assert t["all_verifiers_failed"] is False
    failed = [c for c in t["candidates"] if c["verdicts"]["aspect:approval"]["error"]]
    assert len(failed) == 2
    for c in t["candidates"]:
        agreement = c["verdicts"]["agreement"]["score"]
        if c in failed:
            assert c["verdicts"]["aspect:approval"]["score"] is None
            assert c["scores"]["verifiers"] == pytest.approx(agreement)  # scored by agreement alone
        else:
            assert c["scores"]["verifiers"] == pytest.approx((1.0 + agreement) / 2)
    assert sum(not c["ok"] for c in t["calls"]) == 2
    assert len(t["calls"]) == 1 + 4
    assert usage_of(resp) == fake_upstream.total_usage()


def test_every_verifier_call_failing_answers_from_agreement(fake_upstream: FakeUpstream,
                                                            proxy: ProxyServer) -> None:
    def fail_all() -> None:
        for _ in range(4 * len(DEFAULT_ASPECTS)):
            fake_upstream.push_response(500, ERROR_500)

    fake_upstream.script(candidates_script(["3", "7", "7", "7"], on_candidates=fail_all))
    resp = ask(proxy, {"n": 4, "verifiers": ALL_FOUR})
    assert content(resp).endswith("The answer is 7.")
    t = resp["sharpen"]["trace"]
    assert t["all_verifiers_failed"] is True
    assert any("every verifier call failed" in n for n in t["notes"])
    for c in t["candidates"]:
        assert c["scores"]["verifiers"] == pytest.approx(c["scores"]["agreement"])
        assert all(c["verdicts"][f"aspect:{a}"]["error"] for a in DEFAULT_ASPECTS)
    assert [c["ok"] for c in t["calls"]] == [True] + [False] * 16
    assert usage_of(resp) == fake_upstream.total_usage()


def test_unparseable_everywhere_is_not_a_failure(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    """Replies without a verdict are rejections (not failures): the flag stays off, agreement decides."""
    fake_upstream.script(candidates_script(["3", "7", "7", "7"], verdict=lambda body: "no idea"))
    resp = ask(proxy, {"n": 4, "verifiers": ["approval", "agreement"]})
    assert content(resp).endswith("The answer is 7.")
    t = resp["sharpen"]["trace"]
    assert t["all_verifiers_failed"] is False
    assert all(c["verdicts"]["aspect:approval"]["approved"] is False for c in t["candidates"])


SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"answer": {"type": "integer"}},
                                                  "required": ["answer"]}},
}


def test_json_response_format_adds_the_json_schema_verifier(fake_upstream: FakeUpstream,
                                                            proxy: ProxyServer) -> None:
    outputs = ['{"answer": "seven"}', "{not json", '{"answer": 7}', '{"answer": "seven"}']
    fake_upstream.script(lambda body, i: TRUE if is_verifier(body) else outputs[i])
    resp = ask(proxy, {"n": 4, "verifiers": ["agreement"]}, response_format=SCHEMA_FORMAT)
    t = resp["sharpen"]["trace"]
    assert t["verifiers"] == ["agreement", "json_schema"]
    assert content(resp) == '{"answer": 7}'  # valid beats the (larger) agreement of the invalid ones
    assert [c["verdicts"]["json_schema"]["approved"] for c in t["candidates"]] == [False, False, True, False]
    # the response format still goes upstream for the candidates
    assert candidate_calls(fake_upstream)[0].json["response_format"] == SCHEMA_FORMAT
    # plain requests have no json_schema verifier
    resp = ask(proxy, {"n": 2, "verifiers": ["agreement"]})
    assert resp["sharpen"]["trace"]["verifiers"] == ["agreement"]


def test_regex_verifier(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(candidates_script(["3", "7", "7", "12"]))
    resp = ask(proxy, {"n": 4, "verifiers": ["regex"], "verifier_regex": r"is \d\d\."})
    assert content(resp) == "Path 3. The answer is 12."
    assert fake_upstream.completion_calls() and not verifier_calls(fake_upstream)


@pytest.mark.parametrize("pattern", ["((", "a{2,1}", "(?<=x)y", "x" * 3000])
def test_a_pattern_re2_refuses_is_a_400(proxy: ProxyServer, pattern: str) -> None:
    body = {"model": "fake", "messages": MESSAGES,
            "strategy": {"name": "best_of_n", "n": 2, "verifiers": ["regex"], "verifier_regex": pattern}}
    r = httpx.post(proxy.url + "/chat/completions", json=body, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "strategy.verifier_regex" and err["type"] == "invalid_request_error"


def test_a_catastrophic_regex_does_not_stop_the_server(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    """``^(\\w+\\s?)*$`` backtracks exponentially in Python's ``re`` on words ending in a non-word
    character: 2^60 steps here, which would hold the event loop (and every tenant) for good. The
    check is on completion, not time: while the request matches, another request and /health
    are answered, and the request itself finishes."""
    evil = "word " * 60 + "!"
    fake_upstream.script(lambda body, i: evil)
    body = {"model": "fake", "messages": MESSAGES, "trace": True,
            "strategy": {"name": "best_of_n", "n": 2, "verifiers": ["regex"], "verifier_regex": r"^(\w+\s?)*$"}}
    with httpx.Client(timeout=25) as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
        pending = pool.submit(c.post, proxy.url + "/chat/completions", json=body)
        health = c.get(proxy.root + "/health")
        other = c.post(proxy.url + "/chat/completions", json={"model": "fake", "messages": MESSAGES})
        r = pending.result()
    assert health.status_code == 200 and other.status_code == 200
    assert r.status_code == 200, r.text
    cands = r.json()["sharpen"]["trace"]["candidates"]
    assert [c["verdicts"]["regex"]["approved"] for c in cands] == [False, False]  # really matched, and no match


def test_verifier_model(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> None:
    fake_upstream.adapters["judge"] = "/adapters/judge"
    proxy = make_proxy(fake_upstream.url)
    fake_upstream.script(candidates_script(["7"]))
    ask(proxy, {"n": 2, "verifiers": ["approval"], "verifier_model": "judge"})
    assert [c.json["model"] for c in candidate_calls(fake_upstream)] == ["fake"]
    assert [v.json["model"] for v in verifier_calls(fake_upstream)] == ["judge", "judge"]


def test_soft_off_asks_for_no_verifier_logprobs(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(candidates_script(["7"]))
    resp = ask(proxy, {"n": 2, "verifiers": ["approval"], "soft": False})
    assert all("logprobs" not in v.json for v in verifier_calls(fake_upstream))
    assert all(c["verdicts"]["aspect:approval"]["soft"] is False for c in resp["sharpen"]["trace"]["candidates"])


@pytest.mark.parametrize(("weights", "needle"), [({"aproval": 2}, "aproval"), ({"approval": -1}, "at least 0")])
def test_bad_weights_are_400(fake_upstream: FakeUpstream, proxy: ProxyServer, weights: dict[str, float],
                             needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(proxy, {"n": 2, "weights": weights})
    assert err.value.body["param"] == "strategy.weights"  # type: ignore[index]
    assert needle in err.value.body["message"]  # type: ignore[index]
    assert fake_upstream.completion_calls() == []


# ---- issue 12: the measured defaults, answer groups, program-aided candidates -----------------


def test_the_confidence_vote_makes_no_verifier_calls(fake_upstream: FakeUpstream,
                                                               proxy: ProxyServer) -> None:
    fake_upstream.script(candidates_script(["3", "7", "7", "3"]))
    # the two 3s are far surer than the two 7s: the confidence-weighted vote picks 3
    fake_upstream.logprob_fn = lambda body, i, j, tok: -0.02 if i in (0, 3) else -1.5
    resp = ask(proxy, {"n": 4})
    assert content(resp).endswith("The answer is 3.")
    assert verifier_calls(fake_upstream) == []
    (cand,) = candidate_calls(fake_upstream)
    assert cand.json["logprobs"] is True and cand.json["top_logprobs"] >= 1
    t = resp["sharpen"]["trace"]
    assert t["verifiers"] == ["confidence"] and t["answer"] == "3"
    assert resp["choices"][0]["logprobs"] is None  # asked upstream, not by the client


def test_a_stronger_verifier_model_brings_the_llm_aspects(fake_upstream: FakeUpstream,
                                                          make_proxy: Callable[..., ProxyServer]) -> None:
    fake_upstream.adapters["judge"] = "/adapters/judge"
    proxy = make_proxy(fake_upstream.url)
    fake_upstream.script(candidates_script(["7"]))
    resp = ask(proxy, {"n": 2, "verifier_model": "judge"})
    assert resp["sharpen"]["trace"]["verifiers"][0] == "confidence"
    assert {aspect_of(v.json) for v in verifier_calls(fake_upstream)} == set(DEFAULT_ASPECTS)


def test_llm_verdicts_join_the_group_vote(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    # approval rejects every 7; with a heavy approval weight the lone approved 3 wins the vote
    fake_upstream.script(candidates_script(
        ["3", "7", "7", "7"], verdict=lambda body: FALSE if "The answer is 7" in body["messages"][-1]["content"]
        else TRUE))
    resp = ask(proxy, {"n": 4, "verifiers": ["confidence", "approval"], "weights": {"approval": 5}})
    assert content(resp).endswith("The answer is 3.")
    resp = ask(proxy, {"n": 4, "verifiers": ["confidence", "approval"], "weights": {"approval": 0.01},
                       "vote_temperature": None})
    assert content(resp).endswith("The answer is 7.")  # one vote each: the majority


def test_program_aided_candidates_and_the_execution_verifier(fake_upstream: FakeUpstream,
                                                             proxy: ProxyServer) -> None:
    def script(body: dict[str, Any], i: int) -> str:
        if "Python program" in body["messages"][-1]["content"]:
            return "```python\nprint(2 + 1)\n```" if i == 0 else "```python\nimport sys; sys.exit(1)\n```"
        return f"Path {i}. The answer is {['7', '3', '7'][i]}."

    fake_upstream.script(script)
    resp = ask(proxy, {"n": 5, "pal": 2, "vote_temperature": None})
    # prose 7, 3, 7 and one executed 3 (the other run failed: it abstains): 2 against 2, and the
    # execution verifier raises the 3s
    t = resp["sharpen"]["trace"]
    assert t["verifiers"] == ["confidence", "execution"]
    by_answer = {c["answer"]: c["verdicts"]["execution"]["score"] for c in t["candidates"] if not c["content"]
                 .startswith("```")}
    assert by_answer["3"] == 1.0 and by_answer["7"] == 0.0
    assert content(resp) == "Path 1. The answer is 3."
    assert sorted(c["purpose"] for c in t["calls"]) == ["candidates", "candidates:pal"]  # concurrent calls


@pytest.mark.parametrize(("strategy", "param"), [({"n": 4, "pal": 5}, "strategy.pal"),
                                                 ({"n": 4, "verifiers": ["confidance"]}, "strategy.verifiers"),
                                                 ({"n": 4, "keep": 0}, "strategy.keep"),
                                                 ({"n": 4, "vote_temperature": 0}, "strategy.vote_temperature")])
def test_bad_selection_options_are_400(fake_upstream: FakeUpstream, proxy: ProxyServer, strategy: dict[str, Any],
                                       param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(proxy, strategy)
    assert err.value.body["param"] == param  # type: ignore[index]
    assert fake_upstream.completion_calls() == []


def _raw_ask(proxy: ProxyServer, strategy: dict[str, Any], content: str = "What is 3 + 4?") -> dict[str, Any]:
    r = _client(proxy.url).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": content}],
        extra_body={"strategy": {"name": "best_of_n", **strategy}, "trace": True})
    return r.model_dump()


def test_the_measured_default_four_programs_and_the_confidence_vote(fake_upstream: FakeUpstream,
                                                                   proxy: ProxyServer) -> None:
    def script(body: dict[str, Any], i: int) -> str:
        if "Python program" in body["messages"][-1]["content"]:
            return "```python\nprint(3 + 4)\n```"
        return f"Path {i}. The answer is {['7', '8', '8', '9'][i]}."

    fake_upstream.script(script)
    resp = _raw_ask(proxy, {})
    t = resp["sharpen"]["trace"]
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == [("candidates", 4), ("candidates:pal", 4)]
    assert t["verifiers"] == ["confidence", "execution"]
    assert t["weights"] == {"confidence": 1.0, "execution": 0.5} and t["vote_temperature"] == 0.05
    assert content(resp) == "Path 0. The answer is 7."  # the executed 7s carry the lone prose 7
    assert verifier_calls(fake_upstream) == []


def test_programs_abstain_on_free_form_prompts(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    def script(body: dict[str, Any], i: int) -> str:
        if "Python program" in body["messages"][-1]["content"]:
            return "```python\nprint('roses')\n```"
        return ["Violets are blue", "Sugar is sweet", "And so are you"][i % 3]

    fake_upstream.script(script)
    resp = _raw_ask(proxy, {"n": 5, "pal": 2}, "Write a short poem.")
    assert "roses" not in content(resp)
    assert any("program-aided candidates abstain" in n for n in resp["sharpen"]["trace"]["notes"])
