"""Programmatic verifiers: answer agreement, a regular expression, JSON (schema) validity."""

from __future__ import annotations

from typing import Any

import pytest

from strategies.answers import extract
from strategies.base import Candidate
from strategies.verifiers.agreement import Agreement
from strategies.verifiers.base import VerificationTask
from strategies.verifiers.json_schema import JsonSchemaValid, schema_of
from strategies.verifiers.regex import RegexMatch
from tests.fakes.transport import offline_context


def _task(*contents: str, response_format: dict[str, Any] | None = None) -> VerificationTask:
    cands = [Candidate(index=i, content=c, answer=extract(c)) for i, c in enumerate(contents)]
    return VerificationTask(messages=[{"role": "user", "content": "q"}], candidates=cands,
                            response_format=response_format)


async def test_agreement_shares() -> None:
    task = _task("The answer is 7.", "Answer: 3", "so 7", "The answer is 7.0", "")
    verdicts = await Agreement().score(task, offline_context())
    assert [d.score for d in verdicts] == [0.6, 0.2, 0.6, 0.6, 0.0]
    assert [d.approved for d in verdicts] == [True, False, True, True, False]
    assert verdicts[0].detail == "3/5 agree on '7'"
    assert verdicts[4].detail == "no final answer found"
    assert Agreement.calls_per_candidate == 0


async def test_agreement_half_is_not_approval() -> None:
    verdicts = await Agreement().score(_task("Answer: 1", "Answer: 1", "Answer: 2", "Answer: 2"), offline_context())
    assert all(d.score == 0.5 and d.approved is False for d in verdicts)


async def test_regex() -> None:
    v = RegexMatch(r"^\{.*\}$")
    verdicts = await v.score(_task('{"a": 1}', "no braces", "{x}"), offline_context())
    assert [(d.score, d.approved) for d in verdicts] == [(1.0, True), (0.0, False), (1.0, True)]
    # re.search semantics: anywhere in the content
    (d,) = await RegexMatch(r"\d{3}").score(_task("code 123 ok"), offline_context())
    assert d.approved is True


SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "integer"}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    },
}


async def test_json_schema_valid_invalid_json_and_violation() -> None:
    verdicts = await JsonSchemaValid().score(
        _task('{"answer": 7}', "{not json", '{"answer": "seven"}', '{"other": 1}', '["answer", 7]',
              response_format=SCHEMA_FORMAT),
        offline_context(),
    )
    assert [d.approved for d in verdicts] == [True, False, False, False, False]
    assert [d.score for d in verdicts] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert verdicts[1].detail is not None and verdicts[1].detail.startswith("not JSON")
    for d in verdicts[2:]:
        assert d.detail is not None and d.detail.startswith("schema:")


async def test_json_object_without_schema_checks_only_json() -> None:
    verdicts = await JsonSchemaValid().score(
        _task('{"anything": [1, 2]}', "[]", "plain words", response_format={"type": "json_object"}), offline_context()
    )
    assert [d.approved for d in verdicts] == [True, True, False]


def test_schema_of() -> None:
    assert schema_of(None) is None
    assert schema_of({"type": "json_object"}) is None
    assert schema_of(SCHEMA_FORMAT) == SCHEMA_FORMAT["json_schema"]["schema"]
    # a json_schema object without a "schema" key is taken as the schema itself
    assert schema_of({"type": "json_schema", "json_schema": {"type": "object"}}) == {"type": "object"}


@pytest.mark.parametrize("verifier", [Agreement(), RegexMatch("x"), JsonSchemaValid()])
async def test_one_verdict_per_candidate(verifier: Any) -> None:
    verdicts = await verifier.score(_task("a", "b", "c"), offline_context())
    assert len(verdicts) == 3
    assert all(d.error is None for d in verdicts)
