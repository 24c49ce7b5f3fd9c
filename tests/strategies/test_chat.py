"""strategies/chat.py: the question of a request, the first choice's text, vote ranking and
completions built from the wire models."""

from __future__ import annotations

from typing import Any

from protocol.wire import ChatCompletion, ChatCompletionRequest
from strategies.base import Candidate
from strategies.chat import completion, first_finish, first_text, question, rank_by_votes


def _req(messages: list[dict[str, object]]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": messages})


def test_question_is_the_last_user_message() -> None:
    req = _req([{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "second"}, {"role": "assistant", "content": "b"}])
    assert question(req) == "second"


def test_list_valued_content_is_joined_as_text_never_a_list_repr() -> None:
    req = _req([{"role": "user", "content": [{"type": "text", "text": "What is"},
                                              {"type": "image_url", "image_url": {"url": "x"}},
                                              {"type": "text", "text": "3 + 4?"}]}])
    assert question(req) == "What is 3 + 4?"
    assert question(_req([{"role": "system", "content": "s"}])) == ""


def test_first_text_and_finish_tolerate_odd_answers() -> None:
    data = {"choices": [{"message": {"content": "hi"}, "finish_reason": "length"}]}
    assert (first_text(data), first_finish(data)) == ("hi", "length")
    odds: list[dict[str, Any]] = [{}, {"choices": []}, {"choices": [None]}, {"choices": [{"message": None}]}]
    for odd in odds:
        assert (first_text(odd), first_finish(odd)) == ("", "stop")


def test_rank_by_votes_puts_the_majority_first_then_the_best_formed() -> None:
    cands = [Candidate(0, "x", answer="1", finish_reason="stop", logprob=-0.1),
             Candidate(1, "y", answer="2", finish_reason="length", logprob=-0.5),
             Candidate(2, "z", answer="2", finish_reason="stop", logprob=-0.9),
             Candidate(3, "w", answer=None, finish_reason="stop", logprob=0.0)]
    assert [c.index for c in rank_by_votes(cands)] == [2, 1, 0, 3]  # no answer: last


def test_completion_is_a_valid_chat_completion() -> None:
    out = completion("the answer", like={"id": "chatcmpl-up", "created": 5, "model": "m"}, model="fallback",
                     finish_reason="length")
    assert out["id"] == "chatcmpl-up" and out["created"] == 5 and out["model"] == "m"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "the answer"},
                               "finish_reason": "length", "logprobs": None}]
    assert "usage" not in out and "sharpen" not in out  # the server adds honest usage
    ChatCompletion.model_validate({**out, "usage": {}})
    fresh = completion("x", like={}, model="fallback")
    assert fresh["model"] == "fallback" and fresh["id"].startswith("chatcmpl-sharpen-") and fresh["created"] > 0
