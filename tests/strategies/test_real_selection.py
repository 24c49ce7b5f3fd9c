"""The issue-12 selection on the real vLLM (SmolLM2-135M on CPU): the default best_of_n votes
with the model's own token confidence and makes no verifier calls; self_consistency samples in
waves, counts only what it drew and stops on a split first wave; program-aided candidates run in
the sandbox and a failed program never fails the request; with programs, early stopping draws them
first."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import httpx
import pytest

from strategies import pal
from strategies.answers import FORM_OK
from strategies.auto import AutoOptions
from strategies.vote import should_stop
from tests.proxy_server import ProxyServer

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]

QUESTION = [{"role": "user", "content": "What is 7 + 5? Answer briefly and end with 'The answer is X.'"}]


def _ask(proxy: ProxyServer, strategy: dict[str, Any], **kw: Any) -> dict[str, Any]:
    body = {"model": "smollm2-135m-instruct", "messages": QUESTION, "max_tokens": 48, "strategy": strategy,
            "trace": True, **kw}
    r = httpx.post(proxy.url + "/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _usage_adds_up(data: dict[str, Any]) -> None:
    calls = data["sharpen"]["trace"]["calls"]
    for k in ("prompt_tokens", "completion_tokens"):
        assert sum(c["usage"][k] for c in calls) == data["usage"][k]


def test_default_best_of_n_is_a_confidence_vote_with_programs(real_proxy: ProxyServer) -> None:
    data = _ask(real_proxy, {"name": "best_of_n"})
    t = data["sharpen"]["trace"]
    assert t["verifiers"] == ["confidence", "execution"]
    # the default policy: four program-aided candidates of the eight, and no verifier calls at all
    assert sorted((c["purpose"], c["n"]) for c in t["calls"]) == [("candidates", 4), ("candidates:pal", 4)]
    for c in t["candidates"]:
        score = c["verdicts"]["confidence"]["score"]
        assert 0 < score <= 1 and math.isclose(score, math.exp(c["logprob"]), rel_tol=1e-6)
    assert data["choices"][0]["logprobs"] is None
    assert data["choices"][0]["message"]["content"] in [c["content"] for c in t["candidates"]]
    _usage_adds_up(data)


def test_self_consistency_in_waves_counts_what_it_drew(real_proxy: ProxyServer) -> None:
    data = _ask(real_proxy, {"name": "self_consistency", "n": 6, "wave": 2, "stop_threshold": 0.9,
                             "vote": "confidence"})
    t = data["sharpen"]["trace"]
    assert [w["drawn"] for w in t["waves"]] == [c["n"] for c in t["calls"]]
    assert sum(w["drawn"] for w in t["waves"]) == len(t["candidates"]) <= 6
    assert t["stopped_early"] == (len(t["candidates"]) < 6)
    _usage_adds_up(data)


def test_the_early_stopping_recipe_stops_on_a_split_or_a_settled_answer(real_proxy: ProxyServer) -> None:
    data = _ask(real_proxy, {"name": "self_consistency", "n": 8, "wave": 3, "stop_threshold": 0.6,
                             "split_stop": 3, "signal": "tail"}, temperature=1.0)
    t = data["sharpen"]["trace"]
    assert sum(w["drawn"] for w in t["waves"]) == len(t["candidates"]) <= 8
    answers = [c["answer"] if c["form"] == FORM_OK else None for c in t["candidates"][:3]]
    given = [a for a in answers if a is not None]
    if len(set(given)) == len(given):  # no two of the first wave agree: it must have stopped there
        assert t["split"] is True and len(t["candidates"]) == 3
    else:
        assert t["split"] is False
    assert data["choices"][0]["message"]["content"] in [c["content"] for c in t["candidates"]]
    _usage_adds_up(data)


def test_program_aided_candidates_never_fail_the_request(real_proxy: ProxyServer) -> None:
    data = _ask(real_proxy, {"name": "best_of_n", "n": 4, "pal": 2})
    t = data["sharpen"]["trace"]
    assert sorted(c["purpose"] for c in t["calls"]) == ["candidates", "candidates:pal"]
    runs = [c["verdicts"]["execution_run"]["status"] for c in t["candidates"] if "execution_run" in c["verdicts"]]
    assert len(runs) == 2 and set(runs) <= {"ok", "no_code", "failed", "timeout", "no_output", "sandbox_error"}
    assert "execution" in t["verifiers"]
    _usage_adds_up(data)


def test_auto_takes_the_path_its_programs_printed(real_proxy: ProxyServer) -> None:
    # Whatever the small model's programs print, the calls made must be the ones the rule asks
    # for: agreeing programs answer at once, disagreeing ones draw a second wave, and a wave
    # without a leader of two (or two abstentions) escalates to the prose candidates.
    data = _ask(real_proxy, {"name": "auto"}, temperature=1.0)
    n = AutoOptions().n
    t = data["sharpen"]["trace"]
    calls = [(c["purpose"], c["n"]) for c in t["calls"]]
    progs = sorted((c for c in t["candidates"] if "execution_run" in c["verdicts"]), key=lambda c: c["index"])
    assert t["probe"] == "programs" and calls[0] == ("candidates:pal", 2)
    if len(calls) == 1:  # the programs that ran agree (an escalated vote may void their answers, not this path)
        printed = {c["answer"] for c in progs} - {None}
        assert len(printed) == 1 and t["probe_answer"] == next(iter(printed)) and not t["escalated"]
    elif calls == [("candidates:pal", 2)] * 2:  # they disagreed; the second wave settled it
        assert not t["escalated"] and len(progs) == 4
        assert t["probe_answer"] == pal.leader([c["answer"] for c in progs], min_votes=2) is not None
    elif len(calls) == 3:  # the programs ran, disagreed, and the second wave settled nothing
        assert calls == [("candidates:pal", 2), ("candidates:pal", 2), ("candidates", n - 4)] and t["escalated"]
    else:  # no program printed anything: no second wave
        assert calls == [("candidates:pal", 2), ("candidates", n - 2)] and t["escalated"]
    if t["escalated"]:
        assert len(t["candidates"]) == n and t["probe_answer"] is None
    assert data["choices"][0]["message"]["content"] in [c["content"] for c in t["candidates"]]
    _usage_adds_up(data)


def test_self_consistency_with_programs_stops_where_the_rule_says(real_proxy: ProxyServer) -> None:
    # Early stopping with programs among the candidates: programs first, in waves, then prose
    # waves; whatever the small model's programs print, the waves drawn must be the ones the Beta
    # rule asks for over the answers in the order drawn (an abstaining program does not vote).
    threshold = 0.6
    data = _ask(real_proxy, {"name": "self_consistency", "n": 6, "pal": 4, "wave": 2,
                             "stop_threshold": threshold}, temperature=1.0)
    t = data["sharpen"]["trace"]
    cands = sorted(t["candidates"], key=lambda c: c["index"])
    expected, drawn = [], 0
    for purpose in ("candidates:pal", "candidates:pal", "candidates:wave3"):
        expected.append((purpose, 2))
        drawn += 2
        if should_stop([c["answer"] if c["form"] == FORM_OK else None for c in cands[:drawn]], threshold):
            break
    assert [(c["purpose"], c["n"]) for c in t["calls"]] == expected
    assert len(cands) == drawn and t["stopped_early"] == (drawn < 6)
    is_program = ["execution_run" in c["verdicts"] for c in cands]
    assert is_program == [True] * min(drawn, 4) + [False] * (drawn - 4)
    assert data["choices"][0]["message"]["content"] in [c["content"] for c in t["candidates"]]
    _usage_adds_up(data)


def test_a_program_deadline_streams_the_programs_and_counts_what_they_spent(real_proxy: ProxyServer) -> None:
    """vLLM takes the streamed program call with ``continuous_usage_stats``; whether the deadline
    cut it (a one-word prose call, programs that may run on) or not, the candidates and the
    usage agree with what happened."""
    body = {"model": "smollm2-135m-instruct", "max_tokens": 96, "trace": True,
            "messages": [{"role": "user", "content": "In one word: what is the capital of France?"}],
            "strategy": {"name": "best_of_n", "n": 8, "pal": 4, "program_deadline": 1.5}}
    r = httpx.post(real_proxy.url + "/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()
    t = data["sharpen"]["trace"]
    programs = [c for c in t["candidates"] if c["index"] >= 4]
    cut = [n for n in t["notes"] if "program deadline" in n]
    if cut:  # closed early: only finished programs, one of them printed an answer (the trace's answer
        # may still be None: on free-form answers programs abstain after they ran)
        assert 1 <= len(programs) < 4
        assert any(c["verdicts"]["execution_run"]["status"] == "ok" for c in programs)
        assert cut[0].startswith(f"programs: {len(programs)} of 4")
    else:
        assert len(programs) == 4
    (pal_call,) = [c for c in t["calls"] if c["purpose"] == "candidates:pal"]
    assert pal_call["usage"]["prompt_tokens"] > 0 and pal_call["usage"]["completion_tokens"] >= len(programs)
    _usage_adds_up(data)
