"""LLM aspect verifiers: reading a verdict, its soft score, and one call per candidate."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.settings import UpstreamSettings
from server.upstream import Upstream
from strategies.base import Candidate, StrategyContext
from strategies.verifiers import build
from strategies.verifiers.aspect import ASPECTS, AspectVerifier, parse_verdict, verdict_probability
from strategies.verifiers.base import VerificationTask
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(30)

QUESTION = "What is 6 times 7?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FINAL VERIFICATION ANSWER: True", True),
        ("FINAL VERIFICATION ANSWER: False", False),
        ("final verification answer: TRUE", True),
        ("Final Verification Answer: false", False),
        ("**FINAL VERIFICATION ANSWER:** True", True),
        ("FINAL VERIFICATION ANSWER: **False**", False),
        ("FINAL VERIFICATION ANSWER: `True`", True),
        ("FINAL VERIFICATION ANSWER: Yes", True),
        ("FINAL VERIFICATION ANSWER: no.", False),
        ("FINAL VERIFICATION ANSWER: correct", True),
        ("FINAL VERIFICATION ANSWER: Incorrect", False),
        ("FINAL VERIFICATION ANSWER - true", True),
        ("FINAL VERIFICATION ANSWER: True. The steps all check out, no issues.", True),
        ("FINAL VERIFICATION ANSWER: False\n\nYes, I am sure.", False),
        # several verdicts: the last one counts
        ("FINAL VERIFICATION ANSWER: False\nOn reflection...\nFINAL VERIFICATION ANSWER: True", True),
        ("FINAL VERIFICATION ANSWER: True FINAL VERIFICATION ANSWER: False", False),
        # a bare verdict as the last line
        ("Looks fine.\nTrue", True),
        ("  false.  ", False),
        ("**Yes**", True),
        # no verdict
        ("", None),
        (None, None),
        ("The reasoning is sound, I think it is true that 6*7=42.", None),
        ("FINAL VERIFICATION ANSWER: maybe", None),
        ("FINAL VERIFICATION ANSWER: Truest", None),
        ("w0 w1 w2 The answer is 42.", None),
    ],
)
def test_parse_verdict(text: str | None, expected: bool | None) -> None:
    assert parse_verdict(text) is expected


def _entry(token: str, logprob: float, tops: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    if tops is not None:
        e["top_logprobs"] = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in tops]
    return e


def _tokens(*words: str) -> list[dict[str, Any]]:
    return [_entry(w, -0.01, [(w, -0.01)]) for w in words]


def test_verdict_probability_from_top_logprobs() -> None:
    lp_true, lp_false = math.log(0.8), math.log(0.2)
    content = [*_tokens("FINAL", " VERIFICATION", " ANSWER", ":"),
               _entry(" True", lp_true, [(" True", lp_true), (" False", lp_false), (" Maybe", -5.0)])]
    assert verdict_probability({"content": content}) == pytest.approx(0.8)
    # the sampled token being "False" does not matter: the probability of approval does
    content[-1] = _entry(" False", lp_false, [(" True", lp_true), (" False", lp_false)])
    assert verdict_probability({"content": content}) == pytest.approx(0.8)


def test_verdict_probability_sums_synonyms() -> None:
    content = [_entry("Yes", math.log(0.5), [("Yes", math.log(0.5)), ("True", math.log(0.1)),
                                            ("No", math.log(0.2)), ("false", math.log(0.2))])]
    assert verdict_probability({"content": content}) == pytest.approx(0.6)


def test_verdict_probability_without_top_logprobs_uses_the_sampled_token() -> None:
    assert verdict_probability({"content": [_entry(" True", -0.3)]}) == 1.0
    assert verdict_probability({"content": [_entry(" False", -0.3)]}) == 0.0


def test_verdict_probability_ignores_trailing_yes_no_after_the_verdict() -> None:
    lp = math.log(0.9)
    content = [*_tokens("FINAL", " VERIFICATION", " ANSWER", ":"),
               _entry(" True", lp, [(" True", lp), (" False", math.log(0.1))]),
               *_tokens(".", " No", " issues", "."),
               ]
    # the verdict token, not the "No" of the trailing remark
    assert verdict_probability({"content": content}) == pytest.approx(0.9)


def test_verdict_probability_last_verdict_counts() -> None:
    content = [*_tokens("FINAL", " VERIFICATION", " ANSWER", ":", " False", "\n", "FINAL", " VERIFICATION",
                        " ANSWER", ":"),
               _entry(" True", math.log(0.7), [(" True", math.log(0.7)), (" False", math.log(0.3))])]
    assert verdict_probability({"content": content}) == pytest.approx(0.7)


@pytest.mark.parametrize(
    "logprobs",
    [
        None,
        {},
        {"content": None},
        {"content": []},
        {"content": _tokens("The", " answer", " is", " 42")},  # no verdict token at all
        # a verdict token whose alternatives carry no logprob
        {"content": [{"token": "True", "logprob": None, "top_logprobs": [{"token": "True", "logprob": None}]}]},
    ],
)
def test_verdict_probability_absent(logprobs: dict[str, Any] | None) -> None:
    assert verdict_probability(logprobs) is None


# ---------------------------------------------------------------------------- against the fake


@pytest.fixture
async def ctx(fake_upstream: FakeUpstream) -> AsyncIterator[StrategyContext]:
    up = Upstream(fake_upstream.url, UpstreamSettings())
    yield StrategyContext(upstream=up, body={}, endpoint="/chat/completions", model="fake", tenant="t",
                          deadline=time.monotonic() + 20)
    await up.aclose()


def _task(*contents: str) -> VerificationTask:
    cands = [Candidate(index=i, content=c) for i, c in enumerate(contents)]
    return VerificationTask(messages=[{"role": "user", "content": QUESTION}], candidates=cands)


def _verdict_script(verdict_for: dict[str, str]) -> Any:
    """Answers a verifier prompt by the candidate it contains."""

    def script(body: dict[str, Any], i: int) -> str:
        user = body["messages"][-1]["content"]
        for needle, reply in verdict_for.items():
            if needle in user:
                return reply
        return "FINAL VERIFICATION ANSWER: True"

    return script


async def test_prompt_holds_question_candidate_and_aspect(fake_upstream: FakeUpstream, ctx: StrategyContext) -> None:
    fake_upstream.script(_verdict_script({}))
    v = AspectVerifier("math_steps")
    verdicts = await v.score(_task("6*7 = 42. The answer is 42."), ctx)
    assert len(verdicts) == 1 and verdicts[0].approved is True
    (call,) = fake_upstream.completion_calls()
    body = call.json
    assert body["model"] == "fake"
    assert body["temperature"] == 0.0
    assert body["max_tokens"] == 16  # brief style
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    system, user = body["messages"]
    assert system["role"] == "system" and "verifier" in system["content"]
    text = user["content"]
    assert QUESTION in text
    assert "6*7 = 42. The answer is 42." in text
    assert ASPECTS["math_steps"] in text
    assert "FINAL VERIFICATION ANSWER" in text
    # the aspect comes after question and candidate (shared prefix across aspects)
    assert text.index(QUESTION) < text.index("6*7 = 42") < text.index(ASPECTS["math_steps"])
    assert ctx.calls[0].purpose == "verify:math_steps"
    assert ctx.usage.total_tokens == call.usage["total_tokens"]


async def test_one_call_per_candidate_and_verdicts_in_order(fake_upstream: FakeUpstream,
                                                           ctx: StrategyContext) -> None:
    fake_upstream.script(_verdict_script({"The answer is 41": "Wrong.\nFINAL VERIFICATION ANSWER: False"}))
    v = AspectVerifier("approval")
    verdicts = await v.score(_task("The answer is 42.", "The answer is 41.", "The answer is 42!"), ctx)
    assert [d.approved for d in verdicts] == [True, False, True]
    assert [d.score for d in verdicts] == [1.0, 0.0, 1.0]
    assert all(d.error is None for d in verdicts)
    assert len(fake_upstream.completion_calls()) == 3
    assert len(ctx.calls) == 3


async def test_soft_score_from_the_fake_logprobs(fake_upstream: FakeUpstream, ctx: StrategyContext) -> None:
    fake_upstream.script(_verdict_script({"41": "FINAL VERIFICATION ANSWER: False"}))
    fake_upstream.logprob_fn = lambda body, i, j, tok: -0.2
    verdicts = await AspectVerifier("approval").score(_task("The answer is 42.", "The answer is 41."), ctx)
    # the fake's alternatives are never verdict words, so all the mass is on the sampled verdict
    assert verdicts[0].soft and verdicts[0].score == pytest.approx(1.0) and verdicts[0].approved
    assert verdicts[1].soft and verdicts[1].score == pytest.approx(0.0) and verdicts[1].approved is False


async def test_soft_score_between_zero_and_one(fake_upstream: FakeUpstream, ctx: StrategyContext) -> None:
    lp_t, lp_f = math.log(0.75), math.log(0.25)
    fake_upstream.push_response(200, {
        "id": "x", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "FINAL VERIFICATION ANSWER: True"},
                     "logprobs": {"content": [*_tokens("FINAL", " VERIFICATION", " ANSWER", ":"),
                                              _entry(" True", lp_t, [(" True", lp_t), (" False", lp_f)])]}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55},
    })
    (d,) = await AspectVerifier("approval").score(_task("The answer is 42."), ctx)
    assert d.soft is True and d.approved is True
    assert d.score == pytest.approx(0.75)
    assert ctx.usage.total_tokens == 55


async def test_hard_score_when_soft_is_off(fake_upstream: FakeUpstream, ctx: StrategyContext) -> None:
    fake_upstream.script(_verdict_script({}))
    (d,) = await AspectVerifier("approval", soft=False).score(_task("The answer is 42."), ctx)
    assert d.score == 1.0 and d.soft is False
    body = fake_upstream.completion_calls()[0].json
    assert "logprobs" not in body and "top_logprobs" not in body


async def test_unparseable_reply_is_a_rejection_not_an_error(fake_upstream: FakeUpstream,
                                                             ctx: StrategyContext) -> None:
    fake_upstream.script(lambda body, i: "Hmm, hard to say.")
    (d,) = await AspectVerifier("facts").score(_task("The answer is 42."), ctx)
    assert d.score == 0.0 and d.approved is False and d.error is None
    assert d.detail is not None and "unparseable" in d.detail


@pytest.mark.parametrize("fault", ["500", "400", "garbage"])
async def test_upstream_failure_becomes_verdict_error(fake_upstream: FakeUpstream, ctx: StrategyContext,
                                                      fault: str) -> None:
    fake_upstream.fault = fault
    verdicts = await AspectVerifier("approval").score(_task("The answer is 42.", "The answer is 41."), ctx)
    assert len(verdicts) == 2
    for d in verdicts:
        assert d.score is None and d.approved is None
        assert d.error
    assert [c.ok for c in ctx.calls] == [False, False]


async def test_spent_budget_becomes_verdict_error(fake_upstream: FakeUpstream, ctx: StrategyContext) -> None:
    ctx.max_upstream_tokens = 1
    ctx.usage.add({"prompt_tokens": 5, "completion_tokens": 0})
    (d,) = await AspectVerifier("approval").score(_task("The answer is 42."), ctx)
    assert d.score is None and d.error is not None and "budget" in d.error
    assert fake_upstream.completion_calls() == []


async def test_verifier_model_and_reasoned_style(fake_upstream: FakeUpstream, ctx: StrategyContext) -> None:
    fake_upstream.adapters["judge"] = "/adapters/judge"
    fake_upstream.script(lambda body, i: "Checked each step.\nFINAL VERIFICATION ANSWER: True")
    (d,) = await AspectVerifier("logic_steps", model="judge", style="reasoned").score(_task("42"), ctx)
    assert d.approved is True
    body = fake_upstream.completion_calls()[0].json
    assert body["model"] == "judge"
    assert body["max_tokens"] == 320
    assert "Think it through" in body["messages"][-1]["content"]


def test_build_by_name() -> None:
    assert build("approval").name == "aspect:approval"
    assert build("agreement").name == "agreement"
    assert build("json_schema").name == "json_schema"
    assert build("regex", regex=r"\d+").name == "regex"
    with pytest.raises(ValueError, match="verifier_regex"):
        build("regex")
    with pytest.raises(ValueError, match="unknown verifier"):
        build("nope")
    with pytest.raises(ValueError, match="unknown aspect"):
        AspectVerifier("nope")
