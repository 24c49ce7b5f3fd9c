"""self_consistency through the proxy, with the openai SDK against the scripted fake upstream."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(30)


SHARED_SERVER = True  # one fake and one proxy for the module (tests/conftest.py)

MESSAGES: list[Any] = [{"role": "user", "content": "What is 3 + 4?"}]


@functools.cache
def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=20)


def client(proxy: ProxyServer) -> openai.OpenAI:
    return _client(proxy.url)


def ask(proxy: ProxyServer, strategy: Any = None, **kw: Any) -> dict[str, Any]:
    extra = dict(kw.pop("extra_body", {}))
    extra["strategy"] = strategy if strategy is not None else {"name": "self_consistency", "n": 4}
    r = client(proxy).chat.completions.create(model="fake", messages=MESSAGES, extra_body=extra, **kw)
    return r.model_dump()


def content(resp: dict[str, Any], i: int = 0) -> str:
    return str(resp["choices"][i]["message"]["content"])


def calls(fake: FakeUpstream) -> list[RecordedRequest]:
    return fake.completion_calls()


def test_majority_vote_from_one_n_call(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["3", "7", "7", "7"]
    resp = ask(proxy)
    assert content(resp).endswith("The answer is 7.")
    assert len(resp["choices"]) == 1 and resp["choices"][0]["index"] == 0
    (call,) = calls(fake_upstream)
    assert call.json["n"] == 4
    assert call.json["messages"] == MESSAGES
    assert call.json["model"] == "fake"
    assert "strategy" not in call.json and "trace" not in call.json
    assert resp["usage"]["prompt_tokens"] == call.usage["prompt_tokens"]  # type: ignore[index]
    assert {k: resp["usage"][k] for k in fake_upstream.total_usage()} == fake_upstream.total_usage()
    s = resp["sharpen"]
    assert s["strategy"] == "self_consistency"
    assert s["upstream_calls"] == 1
    assert s["uncertainty"] == pytest.approx(0.25)
    assert "trace" not in s


def test_unanimous_answer_is_certain(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["7"]
    resp = ask(proxy)
    assert resp["sharpen"]["uncertainty"] == 0.0


def test_trace(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["3", "7", "7", "7"]
    resp = ask(proxy, extra_body={"trace": True})
    t = resp["sharpen"]["trace"]
    assert t["options"]["n"] == 4
    assert [c["answer"] for c in t["candidates"]] == ["3", "7", "7", "7"]
    assert [c["scores"]["votes"] for c in t["candidates"]] == [1.0, 3.0, 3.0, 3.0]
    assert all(c["logprob"] is not None for c in t["candidates"])
    assert t["majority_answer"] == "7" and t["answers_parsed"] == 4
    (c,) = t["calls"]
    assert c["purpose"] == "candidates" and c["n"] == 4 and c["ok"] is True
    assert c["usage"] == calls(fake_upstream)[0].usage
    assert t["uncertainty"]["agreement"] == pytest.approx(0.75)


def test_vote_ties_go_to_the_best_formed_candidate(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["3", "3", "7", "7"]
    # choice 3 is by far the most confident: its answer wins the 2-2 tie
    fake_upstream.logprob_fn = lambda body, i, j, tok: -0.01 if i == 3 else -1.0
    resp = ask(proxy, extra_body={"trace": True})
    assert content(resp).endswith("The answer is 7.")
    fake_upstream.logprob_fn = lambda body, i, j, tok: -0.01 if i == 0 else -1.0
    resp = ask(proxy)
    assert content(resp).endswith("The answer is 3.")


def test_client_temperature_zero_is_replaced_and_noted(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    resp = ask(proxy, {"name": "self_consistency", "n": 3, "temperature": 0.9}, temperature=0,
               extra_body={"trace": True})
    assert calls(fake_upstream)[-1].json["temperature"] == 0.9
    notes = resp["sharpen"]["trace"]["notes"]
    assert any("temperature" in n and "0.9" in n for n in notes), notes
    # a sampling temperature the client chose is kept, and nothing is noted
    resp = ask(proxy, {"name": "self_consistency", "n": 3}, temperature=0.5, extra_body={"trace": True})
    assert calls(fake_upstream)[-1].json["temperature"] == 0.5
    assert not any("temperature" in n for n in resp["sharpen"]["trace"]["notes"])


def test_client_n_returns_the_top_candidates(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["3", "7", "5", "7"]
    resp = ask(proxy, n=2)
    assert [c["index"] for c in resp["choices"]] == [0, 1]
    assert all(content(resp, i).endswith("The answer is 7.") for i in range(2))
    # still one upstream call, for the strategy's n (not the client's)
    (call,) = calls(fake_upstream)
    assert call.json["n"] == 4


def test_client_n_above_strategy_n_is_400(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(proxy, n=5)
    assert err.value.status_code == 400
    assert err.value.body["param"] == "n"  # type: ignore[index]
    assert calls(fake_upstream) == []


def test_logprobs_only_when_asked(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    resp = ask(proxy)
    assert calls(fake_upstream)[-1].json["logprobs"] is True  # asked upstream for the tie-break
    assert resp["choices"][0]["logprobs"] is None
    resp = ask(proxy, logprobs=True)
    assert resp["choices"][0]["logprobs"]["content"]


FREE_FORM = ["Paris is lovely in spring", "Rome has the best food", "Paris, without a doubt", "Maybe Lisbon"]


def _free_form(usc_reply: str) -> Any:
    def script(body: dict[str, Any], i: int) -> str:
        prompt = body["messages"][-1]["content"]
        if "most consistent response" in prompt:
            return usc_reply
        return FREE_FORM[i % len(FREE_FORM)]

    return script


def test_usc_when_answers_cannot_be_extracted(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(_free_form("Response 3"))
    resp = ask(proxy, extra_body={"trace": True})
    assert content(resp) == FREE_FORM[2]
    cand, usc = calls(fake_upstream)
    assert cand.json["n"] == 4
    assert "n" not in usc.json or usc.json["n"] == 1
    assert usc.json["temperature"] == 0.0
    prompt = usc.json["messages"][-1]["content"]
    assert MESSAGES[0]["content"] in prompt
    assert all(f"Response {k}:\n{FREE_FORM[k - 1]}" in prompt for k in range(1, 5))
    t = resp["sharpen"]["trace"]
    assert [c["purpose"] for c in t["calls"]] == ["candidates", "usc"]
    assert t["answers_parsed"] == 0
    assert any("universal self-consistency" in n for n in t["notes"])
    assert resp["sharpen"]["upstream_calls"] == 2
    assert {k: resp["usage"][k] for k in fake_upstream.total_usage()} == fake_upstream.total_usage()


def test_usc_unreadable_pick_falls_back_to_best_formed(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(_free_form("I cannot decide."))
    fake_upstream.logprob_fn = lambda body, i, j, tok: -0.01 if i == 1 else -2.0
    resp = ask(proxy, extra_body={"trace": True})
    assert content(resp) == FREE_FORM[1]
    assert any("unreadable" in n for n in resp["sharpen"]["trace"]["notes"])


def test_usc_off_makes_no_extra_call(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(_free_form("Response 3"))
    resp = ask(proxy, {"name": "self_consistency", "n": 4, "usc": False})
    assert len(calls(fake_upstream)) == 1
    assert content(resp) in FREE_FORM


def test_usc_failure_still_answers(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    # the candidates and then a failing USC call, both pushed in arrival order
    fake_upstream.push_response(200, {
        "id": "c", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": i, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": FREE_FORM[i]}} for i in range(4)],
        "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25},
    })
    fake_upstream.push_response(500, {"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
    resp = ask(proxy, extra_body={"trace": True})
    assert content(resp) in FREE_FORM
    t = resp["sharpen"]["trace"]
    assert [(c["purpose"], c["ok"]) for c in t["calls"]] == [("candidates", True), ("usc", False)]
    assert resp["usage"]["total_tokens"] == 25


# ---- issue 12: early stopping, confidence-weighted votes, placeholders, program-aided candidates --


def test_early_stopping_draws_only_until_the_answer_is_settled(fake_upstream: FakeUpstream,
                                                                proxy: ProxyServer) -> None:
    fake_upstream.answers = ["7"]
    resp = ask(proxy, {"name": "self_consistency", "n": 8, "wave": 2, "stop_threshold": 0.95},
               extra_body={"trace": True})
    assert content(resp).endswith("The answer is 7.")
    t = resp["sharpen"]["trace"]
    # 2 unanimous: P = 7/8; 4 unanimous: P = 31/32 >= 0.95: stop after two waves
    assert [c.json["n"] for c in calls(fake_upstream)] == [2, 2]
    assert [w["total"] for w in t["waves"]] == [2, 4] and t["stopped_early"] is True
    assert len(t["candidates"]) == 4
    assert [c["purpose"] for c in t["calls"]] == ["candidates", "candidates:wave2"]
    assert {k: resp["usage"][k] for k in fake_upstream.total_usage()} == fake_upstream.total_usage()
    assert any("stopped after 4 of 8" in n for n in t["notes"])


def test_a_split_vote_draws_every_wave(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["3", "7"]
    resp = ask(proxy, {"name": "self_consistency", "n": 6, "wave": 2, "stop_threshold": 0.95},
               extra_body={"trace": True})
    assert [c.json["n"] for c in calls(fake_upstream)] == [2, 2, 2]
    t = resp["sharpen"]["trace"]
    assert t["stopped_early"] is False and len(t["candidates"]) == 6
    assert sorted(c["index"] for c in t["candidates"]) == list(range(6))


def test_a_split_first_wave_stops_and_the_surest_answers(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["3", "5", "7"]
    # The fake's alternatives trail the sampled token by a fixed gap, so the candidate with the
    # lowest sampled logprob has the most spread-out top-k, i.e. the highest DeepConf confidence.
    fake_upstream.logprob_fn = lambda body, i, j, tok: -3.0 if i == 1 else -0.01
    strategy = {"name": "self_consistency", "n": 8, "wave": 3, "stop_threshold": 0.6, "split_stop": 3,
                "signal": "tail"}
    resp = ask(proxy, strategy, extra_body={"trace": True})
    assert [c.json["n"] for c in calls(fake_upstream)] == [3]  # one wave, not 8 candidates
    assert content(resp).endswith("The answer is 5.")  # no two agree: the most confident one by "tail"
    assert {k: resp["usage"][k] for k in fake_upstream.total_usage()} == fake_upstream.total_usage()
    t = resp["sharpen"]["trace"]
    assert t["stopped_early"] is True and t["split"] is True
    assert any("no two of their answers agree" in n for n in t["notes"])
    by_logprob = ask(proxy, {**strategy, "signal": "mean_logprob"})
    assert not content(by_logprob).endswith("The answer is 5.")  # the signal option is what decided


def test_split_stop_waits_while_two_answers_agree(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["3", "5", "3", "7"]
    resp = ask(proxy, {"name": "self_consistency", "n": 6, "wave": 2, "split_stop": 2}, extra_body={"trace": True})
    # 3, 5 differ after the first wave of 2: stop there
    assert [c.json["n"] for c in calls(fake_upstream)] == [2]
    assert resp["sharpen"]["trace"]["split"] is True


def test_unknown_signal_is_a_400(proxy: ProxyServer) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        ask(proxy, {"name": "self_consistency", "n": 4, "signal": "vibes"})
    assert "signal" in str(e.value)


def test_confidence_vote_follows_the_sure_minority(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.answers = ["3", "3", "7", "3"]
    fake_upstream.logprob_fn = lambda body, i, j, tok: -0.01 if i == 2 else -2.0
    assert content(ask(proxy)).endswith("The answer is 3.")  # majority by default
    resp = ask(proxy, {"name": "self_consistency", "n": 4, "vote": "confidence", "vote_temperature": 0.05})
    assert content(resp).endswith("The answer is 7.")
    assert calls(fake_upstream)[-1].json["top_logprobs"] >= 1


def test_a_copied_placeholder_is_never_the_answer(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(lambda body, i: ["The answer is N.", "The answer is N.", "The answer is N.",
                                          "2 + 3 = 5. The answer is 5."][i])
    msgs = [{"role": "user", "content": "What is 2 + 3? End with 'The answer is N'."}]
    r = client(proxy).chat.completions.create(model="fake", messages=msgs,  # type: ignore[arg-type]
                                              extra_body={"strategy": {"name": "self_consistency", "n": 4}})
    assert r.choices[0].message.content == "2 + 3 = 5. The answer is 5."


def test_program_aided_candidates_vote(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    def script(body: dict[str, Any], i: int) -> str:
        if "Python program" in body["messages"][-1]["content"]:
            return "```python\nprint(3 + 4)\n```" if i < 2 else "```python\nraise ValueError\n```"
        return ["The answer is 7.", "The answer is 8.", "The answer is 9."][i]

    fake_upstream.script(script)
    resp = ask(proxy, {"name": "self_consistency", "n": 6, "pal": 3}, extra_body={"trace": True})
    assert content(resp) == "The answer is 7."  # the prose reply of the winning answer, not the code
    t = resp["sharpen"]["trace"]
    assert sorted(c["purpose"] for c in t["calls"]) == ["candidates", "candidates:pal"]  # concurrent calls
    assert [c.json["n"] for c in calls(fake_upstream)] == [3, 3]
    runs = [c["verdicts"]["execution_run"]["status"] for c in t["candidates"] if "execution_run" in c["verdicts"]]
    assert runs == ["ok", "ok", "failed"]  # a failed program abstains, the request still answers


def test_pal_above_n_is_400(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(proxy, {"name": "self_consistency", "n": 4, "pal": 5})
    assert err.value.body["param"] == "strategy.pal"  # type: ignore[index]
    assert calls(fake_upstream) == []


def test_every_candidate_program_aided(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(lambda body, i: "```python\nprint(7)\n```")
    resp = ask(proxy, {"name": "self_consistency", "n": 2, "pal": 2}, extra_body={"trace": True})
    assert content(resp).endswith("The answer is 7.")
    assert [c["purpose"] for c in resp["sharpen"]["trace"]["calls"]] == ["candidates:pal"]


def _programs_then_prose(printed: list[str], prose: str) -> Any:
    """A script: program-aided calls print ``printed[i]`` (``"fail"``: the program raises), prose
    calls answer ``prose``."""
    def script(body: dict[str, Any], i: int) -> str:
        if "Python program" in body["messages"][-1]["content"]:
            code = "raise ValueError" if printed[i] == "fail" else f"print({printed[i]})"
            return f"```python\n{code}\n```"
        return prose
    return script


EARLY_PAL = {"name": "self_consistency", "n": 8, "pal": 4, "wave": 2, "stop_threshold": 0.6}


def test_early_stopping_with_programs_draws_them_first(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(_programs_then_prose(["7", "7"], "The answer is 9."))
    resp = ask(proxy, EARLY_PAL, extra_body={"trace": True})
    # two agreeing programs: P = 7/8 >= 0.6, so neither the other programs nor any prose is drawn
    assert [(c.json["n"], "Python program" in c.json["messages"][-1]["content"]) for c in calls(fake_upstream)] \
        == [(2, True)]
    assert content(resp).endswith("The answer is 7.")
    t = resp["sharpen"]["trace"]
    assert t["waves"] == [{"drawn": 2, "total": 2, "p_leader": 0.875, "programs": True}]
    assert t["stopped_early"] is True and [c["purpose"] for c in t["calls"]] == ["candidates:pal"]
    assert any("stopped after 2 of 8 candidates" in n for n in t["notes"])  # of the request's n, not of pal
    assert {k: resp["usage"][k] for k in fake_upstream.total_usage()} == fake_upstream.total_usage()


def test_disagreeing_programs_are_followed_by_prose_waves(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(_programs_then_prose(["3", "5"], "The answer is 3."))
    resp = ask(proxy, EARLY_PAL, extra_body={"trace": True})
    t = resp["sharpen"]["trace"]
    # programs 3, 5 then 3, 5 (P = 0.5 twice); a prose wave of two 3s: 4 to 2, P = 0.77: stop at 6 of 8
    assert [c["purpose"] for c in t["calls"]] == ["candidates:pal", "candidates:pal", "candidates:wave3"]
    assert [(w["total"], w.get("programs", False)) for w in t["waves"]] == [(2, True), (4, True), (6, False)]
    assert sorted(c["index"] for c in t["candidates"]) == list(range(6))
    assert t["majority_answer"] == "3" and content(resp) == "The answer is 3."  # the prose reply, not the code
    assert {k: resp["usage"][k] for k in fake_upstream.total_usage()} == fake_upstream.total_usage()


def test_abstaining_programs_leave_the_vote_to_the_prose(fake_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    fake_upstream.script(_programs_then_prose(["fail", "fail"], "The answer is 7."))
    resp = ask(proxy, {**EARLY_PAL, "n": 6}, extra_body={"trace": True})
    t = resp["sharpen"]["trace"]
    assert [c.json["n"] for c in calls(fake_upstream)] == [2, 2, 2]  # no program voted: the prose settles it
    assert [w["p_leader"] for w in t["waves"]] == [0.0, 0.0, 0.875]
    assert content(resp) == "The answer is 7."


def test_without_early_stopping_programs_and_prose_are_one_round_trip(fake_upstream: FakeUpstream,
                                                                      proxy: ProxyServer) -> None:
    fake_upstream.ttft = 0.5
    fake_upstream.script(_programs_then_prose(["7", "7"], "The answer is 7."))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ask, proxy, {"name": "self_consistency", "n": 4, "pal": 2}, extra_body={"trace": True})
        assert fake_upstream.wait_until(lambda: fake_upstream.in_flight == 2)  # both calls at once
        resp = fut.result()
    assert sorted(c["index"] for c in resp["sharpen"]["trace"]["candidates"]) == [0, 1, 2, 3]
    assert content(resp) == "The answer is 7."
