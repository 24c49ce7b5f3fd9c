"""Verifiers: small units that score candidates (see ``strategies.verifiers.base.Verifier``).

Names a request may use: every aspect of ``aspect.ASPECTS`` (LLM verifiers), plus the
programmatic ``agreement``, ``confidence`` (token logprobs), ``execution`` (agreement with
program-aided candidates' executed results), ``json_schema`` and ``regex``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator

from strategies.verifiers.agreement import Agreement
from strategies.verifiers.aspect import ASPECTS, AspectVerifier
from strategies.verifiers.base import Verdict, VerificationTask, Verifier
from strategies.verifiers.confidence import ConfidenceVerifier
from strategies.verifiers.execution import ExecutionAgreement
from strategies.verifiers.json_schema import JsonSchemaValid
from strategies.verifiers.regex import RegexMatch

PROGRAMMATIC = ("agreement", "confidence", "execution", "json_schema", "regex")
NAMES = (*ASPECTS, *PROGRAMMATIC)

__all__ = ["ASPECTS", "NAMES", "PROGRAMMATIC", "Verdict", "VerificationTask", "Verifier", "VerifierNames", "build",
           "known_names"]


def known_names(v: list[str]) -> list[str]:
    """Verifier names, checked and deduplicated: an unknown name is a 400 when options are
    validated, not a 500 later."""
    bad = [x for x in v if x not in NAMES]
    if bad:
        raise ValueError(f"unknown verifier(s) {bad}; valid: {', '.join(NAMES)}")
    return list(dict.fromkeys(v))


VerifierNames = Annotated[list[str], AfterValidator(known_names)]


def build(name: str, *, model: str | None = None, style: Literal["brief", "reasoned"] = "brief",
          regex: str | None = None, soft: bool = True) -> Verifier:
    """A verifier by name; raises ValueError for unknown names or missing arguments."""
    if name in ASPECTS:
        return AspectVerifier(name, model=model, style=style, soft=soft)
    if name == "agreement":
        return Agreement()
    if name == "confidence":
        return ConfidenceVerifier()
    if name == "execution":
        return ExecutionAgreement()
    if name == "json_schema":
        return JsonSchemaValid()
    if name == "regex":
        if not regex:
            raise ValueError("the regex verifier needs the 'verifier_regex' option")
        return RegexMatch(regex)
    raise ValueError(f"unknown verifier {name!r}; valid: {', '.join(NAMES)}")
