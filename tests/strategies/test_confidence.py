"""Confidence signals from token logprobs (strategies/confidence.py)."""

from __future__ import annotations

import math

import pytest

from strategies.confidence import (
    SIGNALS,
    TokenStats,
    from_openai,
    lowest_group,
    measure,
    normalise,
    token_confidence,
    token_self_certainty,
)


def test_token_confidence_is_minus_mean_of_top_k() -> None:
    assert token_confidence([-0.1, -2.5, -3.4]) == pytest.approx(2.0)
    assert token_confidence([]) == 0.0
    # a peaked distribution (alternatives unlikely) is more confident than a flat one
    assert token_confidence([-0.01, -6.0, -7.0]) > token_confidence([-0.7, -0.8, -1.9])


def test_self_certainty_is_zero_for_uniform_and_grows_with_a_peak() -> None:
    flat = [math.log(0.25)] * 4
    assert token_self_certainty(flat) == pytest.approx(0.0, abs=1e-12)
    assert token_self_certainty([-0.01, -6.0, -7.0, -8.0]) > token_self_certainty([-0.5, -1.5, -2.0, -3.0]) > 0
    assert token_self_certainty([-0.1]) == 0.0


def test_lowest_group_finds_the_worst_window() -> None:
    confs = [5.0] * 10 + [1.0] * 3 + [5.0] * 10
    assert lowest_group(confs, window=3) == pytest.approx(1.0)
    assert lowest_group(confs, window=4) == pytest.approx((1.0 * 3 + 5.0) / 4)
    # shorter than the window: one group, the mean
    assert lowest_group([2.0, 4.0], window=64) == pytest.approx(3.0)
    assert lowest_group([], window=3) is None
    with pytest.raises(ValueError):
        lowest_group([1.0], window=0)


def test_lowest_group_matches_brute_force() -> None:
    confs = [((i * 37) % 11) / 3 for i in range(50)]
    w = 7
    brute = min(sum(confs[i:i + w]) / w for i in range(len(confs) - w + 1))
    assert lowest_group(confs, window=w) == pytest.approx(brute)


def test_measure_every_signal() -> None:
    stats = TokenStats(logprobs=(-0.1, -0.3, -2.0, -0.1), confidences=(4.0, 3.0, 0.5, 4.5),
                       self_certainty=(2.0, 1.0, 0.0, 3.0))
    c = measure(stats, window=2, tail=2)
    assert c.mean_logprob == pytest.approx(-0.625)
    assert c.mean_conf == pytest.approx(3.0)
    assert c.lowest_group == pytest.approx(1.75)  # (3.0 + 0.5) / 2
    assert c.tail == pytest.approx(2.5)
    assert c.self_certainty == pytest.approx(1.5)
    assert c.tokens == 4
    assert {s: c.get(s) for s in SIGNALS}["tail"] == pytest.approx(2.5)
    with pytest.raises(KeyError):
        c.get("nope")


def test_measure_of_no_tokens_is_none_not_zero() -> None:
    c = measure(TokenStats((), ()))
    assert (c.mean_logprob, c.mean_conf, c.lowest_group, c.tail, c.self_certainty, c.tokens) == (
        None, None, None, None, None, 0)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenStats((-0.1,), ())


def test_from_openai_logprobs_object() -> None:
    lp = {"content": [
        {"token": "4", "logprob": -0.05, "top_logprobs": [{"token": "4", "logprob": -0.05},
                                                          {"token": "5", "logprob": -3.05}]},
        {"token": ".", "logprob": -0.5, "top_logprobs": []},  # no alternatives: confidence = -logprob
    ]}
    s = from_openai(lp)
    assert s.logprobs == (-0.05, -0.5)
    assert s.confidences == pytest.approx((1.55, 0.5))
    assert s.self_certainty == ()  # not every token had alternatives: not measured
    assert from_openai(None) == TokenStats((), ())
    assert from_openai({"content": None}) == TokenStats((), ())


def test_normalise() -> None:
    assert normalise([1.0, 3.0, None, 2.0]) == [0.0, 1.0, None, 0.5]
    assert normalise([2.0, 2.0]) == [1.0, 1.0]
    assert normalise([None]) == [None]
