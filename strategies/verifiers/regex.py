"""A regular expression the answer must match (``verifier_regex`` option).

The pattern comes from the client, so it is compiled with RE2 (``google-re2``), whose matching
time is linear in the text: a pattern such as ``^(\\w+\\s?)*$`` that makes Python's backtracking
``re`` run for minutes (and stall the event loop for every tenant) is matched in microseconds.
RE2 syntax is Python's without backreferences and lookaround; a pattern RE2 cannot compile is
refused as the request's error, never a server error."""

from __future__ import annotations

from typing import Any

import re2

from strategies.base import StrategyContext
from strategies.verifiers.base import Verdict, VerificationTask, Verifier

MAX_PATTERN_CHARS = 2000
_MAX_MEM = 8 << 20  # RE2's compiled-program budget: a pattern needing more is refused


class InvalidPattern(ValueError):
    """The client's pattern is not one RE2 accepts (or is too long or too large)."""


def compile_pattern(pattern: str) -> Any:
    """The compiled pattern; raises InvalidPattern with the reason."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidPattern(f"the pattern is over {MAX_PATTERN_CHARS} characters")
    opts = re2.Options()
    opts.log_errors = False
    opts.max_mem = _MAX_MEM
    try:
        return re2.compile(pattern, opts)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidPattern(f"invalid regular expression (RE2 syntax): {reason}") from None


class RegexMatch(Verifier):
    """Approves candidates whose content matches the request's pattern (a search, RE2)."""

    name = "regex"

    def __init__(self, pattern: str) -> None:
        self.pattern = compile_pattern(pattern)

    async def score(self, task: VerificationTask, ctx: StrategyContext) -> list[Verdict]:
        out = []
        for c in task.candidates:
            ok = self.pattern.search(c.content) is not None
            out.append(Verdict(1.0 if ok else 0.0, approved=ok))
        return out
