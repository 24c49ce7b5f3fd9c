"""JSON validity, and schema validity when the request's ``response_format`` names a schema."""

from __future__ import annotations

import json
from typing import Any

from strategies.base import StrategyContext
from strategies.verifiers.base import Verdict, VerificationTask, Verifier


def schema_of(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if not response_format:
        return None
    js = response_format.get("json_schema")
    if isinstance(js, dict):
        schema = js.get("schema", js)
        return schema if isinstance(schema, dict) else None
    return None


class JsonSchemaValid(Verifier):
    """Approves candidates that parse as JSON and, given a schema, validate against it."""

    name = "json_schema"

    async def score(self, task: VerificationTask, ctx: StrategyContext) -> list[Verdict]:
        import jsonschema  # only requests that ask for JSON pay for the import

        schema = schema_of(task.response_format)
        validator = jsonschema.Draft202012Validator(schema) if schema else None
        out = []
        for c in task.candidates:
            try:
                doc = json.loads(c.content)
            except ValueError as exc:
                out.append(Verdict(0.0, approved=False, detail=f"not JSON: {exc}"))
                continue
            if validator is not None:
                err = next(iter(validator.iter_errors(doc)), None)
                if err is not None:
                    out.append(Verdict(0.0, approved=False, detail=f"schema: {err.message[:200]}"))
                    continue
            out.append(Verdict(1.0, approved=True))
        return out
