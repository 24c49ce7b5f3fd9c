"""Consensus labels: the majority vote (shares, confidence, finished rationales only), the keep
thresholds, and one n=N call with logprobs against the fake upstream."""

from __future__ import annotations

import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapt.labeller import Label, MajorityVote, keep, vote
from protocol.errors import UpstreamStatusError
from protocol.events import Sample
from server.settings import UpstreamSettings
from server.upstream import Upstream
from strategies.base import Candidate
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(60)


def cand(i: int, answer: str | None, *, lp: float = -0.1, finish: str = "stop") -> Candidate:
    return Candidate(index=i, content=f"work {i}. The answer is {answer}.", answer=answer, logprob=lp,
                     finish_reason=finish)


def test_vote_picks_the_majority_with_its_share_and_confidence() -> None:
    lab = vote("q", [cand(0, "7", lp=-0.1), cand(1, "7", lp=-0.3), cand(2, "3"), cand(3, None)])
    assert lab.answer == "7" and lab.share == 0.5 and lab.n == 4
    assert lab.confidence == pytest.approx((math.exp(-0.1) + math.exp(-0.3)) / 2)
    assert lab.agreeing == ["work 0. The answer is 7.", "work 1. The answer is 7."]  # most confident first
    assert lab.disagreeing == ["work 2. The answer is 3."]


def test_vote_tie_goes_to_the_more_confident_group() -> None:
    lab = vote("q", [cand(0, "7", lp=-2.0), cand(1, "3", lp=-0.1)])
    assert lab.answer == "3" and lab.share == 0.5


def test_truncated_rationales_are_not_examples_and_duplicates_collapse() -> None:
    cands = [cand(0, "7", finish="length"), cand(1, "7"), cand(2, "7")]
    cands[2].content = cands[1].content
    lab = vote("q", cands)
    assert lab.share == 1.0 and lab.agreeing == [cands[1].content]


def test_no_answer_at_all() -> None:
    lab = vote("q", [cand(0, None), cand(1, None)])
    assert (lab.answer, lab.share, lab.confidence, lab.agreeing) == (None, 0.0, 0.0, [])


def prog(i: int, answer: str | None) -> Candidate:
    c = Candidate(index=i, content=f"```python\nprint({answer})\n```", answer=answer, logprob=-0.5,
                  finish_reason="stop")
    c.program = True
    return c


def test_agreeing_programs_decide_the_label_against_the_prose_majority() -> None:
    """Prose says 7 three times to one; the programs that ran agree on 9: the label is 9, its
    share theirs, and the one prose rationale reaching 9 is the example (code never is)."""
    lab = vote("q", [cand(0, "7"), cand(1, "7"), cand(2, "7"), cand(3, "9", lp=-0.4)],
               [prog(4, "9"), prog(5, "9"), prog(6, None)])
    assert (lab.answer, lab.program, lab.share, lab.n) == ("9", "9", 1.0, 6)  # the silent program: no vote
    assert lab.agreeing == ["work 3. The answer is 9."] and len(lab.disagreeing) == 3
    assert lab.confidence == pytest.approx(math.exp(-0.4))  # the prose winners' confidence
    assert keep(lab, min_share=0.5, min_confidence=0.0) is None


def test_pooled_programs_vote_beside_the_prose() -> None:
    """The same candidates pooled: 7 three times against 9 three times (one prose, two programs);
    the tie goes to the more confident group, and the programs decided nothing."""
    lab = vote("q", [cand(0, "7"), cand(1, "7"), cand(2, "7"), cand(3, "9", lp=-0.4)],
               [prog(4, "9"), prog(5, "9"), prog(6, None)], programs_decide=False)
    assert (lab.answer, lab.program, lab.share, lab.n) == ("7", None, 0.5, 6)
    assert len(lab.agreeing) == 3 and len(lab.disagreeing) == 1  # code is never a rationale
    won = vote("q", [cand(0, "7"), cand(1, "9")], [prog(2, "9"), prog(3, "9")], programs_decide=False)
    assert (won.answer, won.program, won.share) == ("9", "9", 0.75)  # they agreed with the winner


async def test_the_labeller_pools_when_configured(make: Any, tmp_path: Path) -> None:
    for rule, decide in (("programs", True), ("pooled", False)):
        svc = await make(start=False, label_vote=rule, directory=tmp_path / rule)
        assert isinstance(svc.labeller, MajorityVote) and svc.labeller.programs_decide is decide
        assert svc.labeller.traces is False
    svc = await make(start=False, label_traces=True, directory=tmp_path / "traces")
    assert isinstance(svc.labeller, MajorityVote) and svc.labeller.traces is True


def test_split_or_silent_programs_leave_the_prose_vote() -> None:
    split = vote("q", [cand(0, "7"), cand(1, "7"), cand(2, "3")], [prog(3, "9"), prog(4, "3")])
    assert split.program is None and split.answer == "7" and split.share == pytest.approx(2 / 5)
    silent = vote("q", [cand(0, "7"), cand(1, "3")], [prog(2, None), prog(3, None)])
    assert silent.program is None and silent.answer in ("7", "3") and (silent.n, silent.share) == (2, 0.5)


def test_a_program_answer_no_prose_reaches_has_no_rationale() -> None:
    lab = vote("q", [cand(0, "7"), cand(1, "7")], [prog(2, "9")])
    assert lab.answer == "9" and lab.agreeing == []
    assert keep(lab, min_share=0.5, min_confidence=0.0) == "no_finished_rationale"


@pytest.mark.parametrize(("label", "reason"), [
    (Label("q", None, 0.0, 0.0, 8), "no_answer"),
    (Label("q", "7", 0.375, 0.9, 8, agreeing=["a"]), "no_majority"),
    (Label("q", "7", 0.75, 0.2, 8, agreeing=["a"]), "low_confidence"),
    (Label("q", "7", 0.75, 0.9, 8, agreeing=[]), "no_finished_rationale"),
    (Label("q", "7", 0.5, 0.5, 8, agreeing=["a"]), None),
])
def test_keep_thresholds(label: Label, reason: str | None) -> None:
    assert keep(label, min_share=0.5, min_confidence=0.5) == reason


@pytest.fixture
async def upstream(fake_upstream: FakeUpstream) -> AsyncIterator[Upstream]:
    up = Upstream(fake_upstream.url, UpstreamSettings())
    yield up
    await up.aclose()


async def test_majority_vote_labels_with_one_n_call(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.script(lambda body, i: "Six and one. The answer is 7." if i % 4 else "Hmm. The answer is 9.")
    lab = await MajorityVote(8, temperature=0.9, max_tokens=64).label(upstream, "fake", "t", "What is 6+1?")
    [call] = fake_upstream.completion_calls()
    body: dict[str, Any] = call.json
    assert body["n"] == 8 and body["temperature"] == 0.9 and body["max_tokens"] == 64 and body["logprobs"] is True
    assert lab.answer == "7" and lab.share == 0.75 and lab.n == 8 and 0 < lab.confidence <= 1
    assert lab.agreeing == ["Six and one. The answer is 7."]


async def test_program_aided_labelling_runs_the_programs(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    """With pal, a second n=k call asks for programs; they run in the real sandbox and their
    printed answer (6 * 7 = 42) overrules the prose majority (40)."""
    if shutil.which("bwrap") is None:
        pytest.skip("the sandbox needs bubblewrap (make system-deps installs it)")

    def reply(body: dict[str, Any], i: int) -> str:
        if "Python program" in str(body["messages"][-1]["content"]):
            return "```python\nprint(6 * 7)\n```"
        return "So 6 times 7. The answer is 42." if i == 0 else "Six sevens. The answer is 40."

    fake_upstream.script(reply)
    lab = await MajorityVote(4, pal=2, max_tokens=64).label(upstream, "fake", "t", "What is 6 times 7?")
    calls = fake_upstream.completion_calls()
    assert [c.json["n"] for c in calls] == [2, 4]  # programs first; no early stop asked for: all prose drawn
    assert (lab.answer, lab.program, lab.share, lab.n) == ("42", "42", 1.0, 6)
    assert lab.agreeing == ["So 6 times 7. The answer is 42."]


async def test_live_samples_count_towards_n_and_only_the_rest_is_drawn(fake_upstream: FakeUpstream,
                                                                       upstream: Upstream) -> None:
    """Three prose samples and two programs from the live request: with n=8 and pal=2 the
    labeller asks for 5 more prose samples and no programs, and every candidate votes."""
    fake_upstream.script(lambda body, i: "Six and one. The answer is 7.")
    prior = [Sample("So 9. The answer is 9.", "9", "stop", -0.2),
             Sample("It is 7. The answer is 7.", "7", "stop", -0.1), Sample("Cut off at 7", "7", "length", -0.3),
             Sample("print(7)", "7", "stop", -0.1, program=True),
             Sample("print(6 + 1)", "7", "stop", -0.1, program=True)]
    lab = await MajorityVote(8, pal=2, max_tokens=64).label(upstream, "fake", "t", "What is 6+1?", prior)
    [call] = fake_upstream.completion_calls()
    assert call.json["n"] == 5 and "Python program" not in str(call.json["messages"])
    assert (lab.answer, lab.program, lab.reused, lab.n) == ("7", "7", 5, 10)
    assert set(lab.agreeing) == {"It is 7. The answer is 7.", "Six and one. The answer is 7."}
    assert "Cut off at 7" not in lab.agreeing and lab.disagreeing == ["So 9. The answer is 9."]


def _seven(body: dict[str, Any], i: int) -> str:
    if "Python program" in str(body["messages"][-1]["content"]):
        return "```python\nprint(6 + 1)\n```"
    return "Six and one. The answer is 7."


LIVE = [Sample("It is 7. The answer is 7.", "7", "stop", -0.1), Sample("So 9. The answer is 9.", "9", "stop", -0.2),
        Sample("Adding, 7. The answer is 7.", "7", "stop", -0.3)]


@pytest.mark.parametrize(("rationales", "prose_drawn"), [
    (2, False),  # the programs settled it and the live samples hold 2 agreeing rationales
    (0, False),  # the answer alone is wanted (the canary's vote)
    (3, True),   # one rationale short: the rest of n is drawn
    (None, True),  # no early stop asked for
])
async def test_prose_is_drawn_only_when_the_programs_leave_it_needed(
        fake_upstream: FakeUpstream, upstream: Upstream, rationales: int | None, prose_drawn: bool) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("the sandbox needs bubblewrap (make system-deps installs it)")
    fake_upstream.script(_seven)
    lab = await MajorityVote(8, pal=2, max_tokens=64).label(upstream, "fake", "t", "What is 6+1?", LIVE, rationales)
    calls = [(c.json["n"], "Python program" in str(c.json["messages"])) for c in fake_upstream.completion_calls()]
    assert calls == ([(2, True), (5, False)] if prose_drawn else [(2, True)])
    assert (lab.answer, lab.program, lab.share, lab.reused) == ("7", "7", 1.0, 3)
    assert len(lab.agreeing) == (3 if prose_drawn else 2) and lab.n == (10 if prose_drawn else 5)


async def test_split_programs_do_not_stop_the_prose(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    """Programs that disagree decide nothing, so the prose vote needs all of n even for an answer alone."""
    if shutil.which("bwrap") is None:
        pytest.skip("the sandbox needs bubblewrap (make system-deps installs it)")

    def reply(body: dict[str, Any], i: int) -> str:
        if "Python program" in str(body["messages"][-1]["content"]):
            return f"```python\nprint({5 + i})\n```"
        return "Six and one. The answer is 7."

    fake_upstream.script(reply)
    lab = await MajorityVote(4, pal=2, max_tokens=64).label(upstream, "fake", "t", "What is 6+1?", (), 0)
    assert [c.json["n"] for c in fake_upstream.completion_calls()] == [2, 4]
    assert (lab.answer, lab.program) == ("7", None)


async def test_enough_live_samples_draw_nothing(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    prior = [Sample(f"Try {i}. The answer is 4.", "4", "stop", -0.1) for i in range(6)]
    lab = await MajorityVote(4).label(upstream, "fake", "t", "What is 2+2?", prior)
    assert fake_upstream.completion_calls() == []
    assert (lab.answer, lab.share, lab.n, lab.reused) == ("4", 1.0, 4, 4)


async def test_upstream_failure_raises(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    fake_upstream.fault = "500"
    with pytest.raises(UpstreamStatusError):
        await MajorityVote(4).label(upstream, "fake", "t", "What is 6+1?")


async def test_rationalization_keeps_hinted_rationales_that_reach_the_label(fake_upstream: FakeUpstream,
                                                                           upstream: Upstream) -> None:
    """STaR: one n=k call of the question with the label as a hint; only finished samples that
    reach the label and do not mention the hint are rationales, most confident first."""
    replies = ["Nine sevens are 63. The answer is 63.", "As the hint says, the answer is 63.",
               "Sixty. The answer is 60.", "7 * 9 = 63. The answer is 63.",
               "Since the working reaches 63, the answer is 63."]
    fake_upstream.script(lambda body, i: replies[i % 5])
    lab = Label("What is 7 times 9?", "63", 1.0, 0.5, 2, program="63")
    got = await MajorityVote(4, max_tokens=64, rationalize=5).rationalize(upstream, "fake", "t", lab)
    [call] = fake_upstream.completion_calls()
    prompt = str(call.json["messages"][-1]["content"])
    assert call.json["n"] == 5 and prompt.startswith("What is 7 times 9?") and "63" in prompt.split("?", 1)[1]
    assert set(got) == {"Nine sevens are 63. The answer is 63.", "7 * 9 = 63. The answer is 63."}


async def test_rationalization_off_or_without_an_answer_calls_nothing(fake_upstream: FakeUpstream,
                                                                     upstream: Upstream) -> None:
    assert await MajorityVote(4).rationalize(upstream, "fake", "t", Label("q", "63", 1.0, 0.5, 2)) == []
    assert await MajorityVote(4, rationalize=2).rationalize(upstream, "fake", "t", Label("q", None, 0.0, 0.0, 2)) == []
    assert fake_upstream.completion_calls() == []


def _worked(body: dict[str, Any], i: int) -> str:
    if "Python program" in str(body["messages"][-1]["content"]):
        return "```python\nt = 6 * 7 - 2\nprint(t)\n```"
    return "Six sevens less two. The answer is 40." if i == 0 else "About 41. The answer is 41."


WORKING = "t = 6 * 7 - 2\n= 42 - 2\n= 40\nThe answer is 40."


async def test_traces_put_the_programs_working_first(fake_upstream: FakeUpstream, upstream: Upstream) -> None:
    """The two agreeing programs' working (one text: they are the same program) comes before
    the prose that reaches their answer, and is counted."""
    if shutil.which("bwrap") is None:
        pytest.skip("the sandbox needs bubblewrap (make system-deps installs it)")
    fake_upstream.script(_worked)
    lab = await MajorityVote(4, pal=2, max_tokens=64, traces=True).label(upstream, "fake", "t", "6 * 7 - 2?")
    assert (lab.answer, lab.program, lab.traced) == ("40", "40", 1)
    assert lab.agreeing == [WORKING, "Six sevens less two. The answer is 40."]
    off = await MajorityVote(4, pal=2, max_tokens=64).label(upstream, "fake", "t", "6 * 7 - 2?")
    assert off.traced == 0 and off.agreeing == ["Six sevens less two. The answer is 40."]


async def test_the_working_can_settle_a_question_before_the_prose(fake_upstream: FakeUpstream,
                                                                  upstream: Upstream) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("the sandbox needs bubblewrap (make system-deps installs it)")
    fake_upstream.script(_worked)
    lab = await MajorityVote(4, pal=2, max_tokens=64, traces=True).label(upstream, "fake", "t", "6 * 7 - 2?",
                                                                         rationales=1)
    assert [c.json["n"] for c in fake_upstream.completion_calls()] == [2]  # the programs only
    assert lab.agreeing == [WORKING] and lab.traced == 1


async def test_no_working_where_only_the_answer_is_wanted_or_the_prose_wins(fake_upstream: FakeUpstream,
                                                                            upstream: Upstream) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("the sandbox needs bubblewrap (make system-deps installs it)")
    fake_upstream.script(_worked)
    answer_only = await MajorityVote(4, pal=2, max_tokens=64, traces=True).label(
        upstream, "fake", "t", "6 * 7 - 2?", rationales=0)
    assert answer_only.traced == 0 and WORKING not in answer_only.agreeing
    fake_upstream.script(lambda body, i: "```python\nt = 6 * 7 - 2\nprint(t)\n```"
                         if "Python program" in str(body["messages"][-1]["content"]) else "So 41. The answer is 41.")
    pooled = await MajorityVote(6, pal=2, max_tokens=64, traces=True, programs_decide=False).label(
        upstream, "fake", "t", "6 * 7 - 2?")
    assert pooled.answer == "41" and pooled.traced == 0 and WORKING not in pooled.agreeing
