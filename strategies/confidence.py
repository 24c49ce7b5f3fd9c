"""How sure the model was of one candidate, from the token logprobs the upstream already returns.

No extra upstream calls. Per token, two numbers are enough (``TokenStats``):
- the chosen token's logprob;
- DeepConf's token confidence (Fu et al., arXiv 2508.15260): minus the mean logprob of the top-k
  alternatives. High when the distribution is peaked (the alternatives are all unlikely).

Per candidate (``Confidence``):
- ``mean_logprob``: mean chosen-token logprob (the classic length-normalised likelihood);
- ``mean_conf``: DeepConf's average trace confidence;
- ``lowest_group``: DeepConf's lowest group confidence, the minimum over sliding windows of
  ``window`` tokens of the mean token confidence: one confused stretch sinks a trace;
- ``tail``: the mean token confidence over the last ``tail`` tokens, where the answer is stated;
- ``self_certainty``: KL(uniform || p) over the top-k alternatives renormalised (Kang et al.,
  arXiv 2502.18581), an approximation: the full distribution is not returned.

Pure: imports nothing from the server; tested in ``tests/strategies/test_confidence.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

WINDOW = 64  # tokens; DeepConf uses 2048 for long traces, short replies need a shorter window
TAIL = 32
SIGNALS = ("mean_logprob", "mean_conf", "lowest_group", "tail", "self_certainty")


@dataclass(frozen=True)
class TokenStats:
    """Per-token logprob of the chosen token and token confidence (both floats, same length);
    ``self_certainty`` per token where the top-k alternatives were returned, else empty."""

    logprobs: tuple[float, ...]
    confidences: tuple[float, ...]
    self_certainty: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.confidences):
            raise ValueError("logprobs and confidences must have one value per token")


@dataclass(frozen=True)
class Confidence:
    """A candidate's confidence signals; None where there were no tokens to measure."""

    mean_logprob: float | None
    mean_conf: float | None
    lowest_group: float | None
    tail: float | None
    self_certainty: float | None
    tokens: int

    def get(self, signal: str) -> float | None:
        """One signal by name (one of ``SIGNALS``)."""
        if signal not in SIGNALS:
            raise KeyError(f"unknown confidence signal {signal!r} (one of {', '.join(SIGNALS)})")
        value: float | None = getattr(self, signal)
        return value


def token_confidence(top_logprobs: Sequence[float]) -> float:
    """DeepConf's token confidence: minus the mean of the top-k logprobs (0 when none given)."""
    if not top_logprobs:
        return 0.0
    return -sum(max(x, -100.0) for x in top_logprobs) / len(top_logprobs)


def token_self_certainty(top_logprobs: Sequence[float]) -> float:
    """KL(uniform || p) over the k alternatives renormalised to sum to one: ``-mean(log(k * p_i))``.
    0 when the k alternatives were equally likely; grows as one dominates; 0 when fewer than two
    are given."""
    k = len(top_logprobs)
    if k < 2:
        return 0.0
    xs = [max(x, -100.0) for x in top_logprobs]
    m = max(xs)
    log_z = m + math.log(sum(math.exp(x - m) for x in xs))
    return -sum(math.log(k) + x - log_z for x in xs) / k


def from_openai(logprobs: dict[str, Any] | None) -> TokenStats:
    """TokenStats from an OpenAI-style ``choices[i].logprobs`` object (``content`` list of
    ``{token, logprob, top_logprobs: [{token, logprob}]}``). Missing pieces give empty stats."""
    lps: list[float] = []
    confs: list[float] = []
    certs: list[float] = []
    content = (logprobs or {}).get("content") or []
    for t in content:
        if not isinstance(t, dict) or t.get("logprob") is None:
            continue
        lps.append(max(float(t["logprob"]), -100.0))
        tops = [float(a["logprob"]) for a in t.get("top_logprobs") or [] if isinstance(a, dict)
                and a.get("logprob") is not None]
        confs.append(token_confidence(tops) if tops else -lps[-1])
        if len(tops) >= 2:
            certs.append(token_self_certainty(tops))
    return TokenStats(tuple(lps), tuple(confs), tuple(certs) if len(certs) == len(lps) else ())


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def lowest_group(confidences: Sequence[float], window: int = WINDOW) -> float | None:
    """The minimum over every sliding window of ``window`` tokens of the mean confidence; a trace
    shorter than the window is one group. O(n) with a running sum."""
    n = len(confidences)
    if n == 0:
        return None
    if window <= 0:
        raise ValueError("window must be positive")
    if n <= window:
        return sum(confidences) / n
    s = sum(confidences[:window])
    best = s
    for i in range(window, n):
        s += confidences[i] - confidences[i - window]
        best = min(best, s)
    return best / window


def measure(stats: TokenStats, *, window: int = WINDOW, tail: int = TAIL) -> Confidence:
    """Every signal of one candidate."""
    confs = stats.confidences
    return Confidence(
        mean_logprob=_mean(stats.logprobs),
        mean_conf=_mean(confs),
        lowest_group=lowest_group(confs, window),
        tail=_mean(confs[-tail:]) if confs else None,
        self_certainty=_mean(stats.self_certainty),
        tokens=len(stats.logprobs),
    )


def normalise(values: Iterable[float | None]) -> list[float | None]:
    """Min-max scaled to [0, 1] across candidates (all equal: 1.0); None stays None. Signals differ
    in scale; a vote weight or a verifier score wants them comparable."""
    vs = list(values)
    present = [v for v in vs if v is not None]
    if not present:
        return vs
    lo, hi = min(present), max(present)
    return [None if v is None else (1.0 if hi == lo else (v - lo) / (hi - lo)) for v in vs]
