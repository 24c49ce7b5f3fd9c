"""protocol/wire.py: message text, the one JSON parser and the one pydantic-error reader."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from protocol.errors import InvalidRequest
from protocol.wire import ChatCompletionRequest, first_problem, parse_json, text_of, validate


@pytest.mark.parametrize(("content", "text"), [
    ("plain", "plain"),
    (None, ""),
    ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}], "a b"),
    ([], ""),
])
def test_text_of_never_returns_a_list_repr(content: object, text: str) -> None:
    assert text_of(content) == text  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2"])
def test_malformed_json_is_one_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_json(raw)
    assert err.value.message.startswith("We could not parse the JSON body of your request")


def test_validate_names_the_field() -> None:
    with pytest.raises(InvalidRequest) as err:
        validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "n": 0})
    assert err.value.param == "n" and "'n'" in err.value.message
    with pytest.raises(InvalidRequest) as missing:
        validate(ChatCompletionRequest, {})
    assert missing.value.message == "Invalid request: 'messages' is required."
    with pytest.raises(InvalidRequest):
        validate(ChatCompletionRequest, [1])


def test_first_problem_reads_location_message_and_kind() -> None:
    class M(BaseModel):
        a: int

    with pytest.raises(ValidationError) as exc:
        M.model_validate({"a": "x"})
    loc, msg, kind = first_problem(exc.value)
    assert (loc, kind) == ("a", "int_parsing") and msg
