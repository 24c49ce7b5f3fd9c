"""The eval runner against sharpen in front of the scripted fake upstream: one JSONL record per
(strategy, item) with the tokens the upstream spent on it, resuming an interrupted run, and
retrying what failed."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from evals import report
from evals.datasets import Item
from evals.runner import Runner, completed, parse_strategies
from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(60)

WRONG_FIRST = {0, 3}  # on these items the first sample is wrong, the other two right
ITEMS = [Item(id=f"q{k}", question=f"Question {k}: what is {k} + {k}?", answer=str(2 * k), checker="numeric")
         for k in range(6)]
SPECS = parse_strategies("passthrough,self_consistency:n=3")
N_OF = {"passthrough": 1, "self_consistency:n=3": 3}  # the n each strategy's upstream call carries


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPEN_DATA_DIR", str(tmp_path / "data"))


def _question(body: dict[str, Any]) -> int:
    m = re.search(r"Question (\d+):", str(body["messages"][-1]["content"]))
    assert m, body
    return int(m.group(1))


def answer_script(body: dict[str, Any], i: int) -> str:
    k = _question(body)
    ans = 2 * k + 1 if k in WRONG_FIRST and i == 0 else 2 * k
    return f"w0 w1 step {i} The answer is {ans}."


@pytest.fixture
def served(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> Iterator[tuple[FakeUpstream,
                                                                                                   ProxyServer]]:
    fake_upstream.script(answer_script)
    yield fake_upstream, make_proxy(fake_upstream.url, memory={"enabled": False})


def _runner(proxy: ProxyServer, out: Path, concurrency: int = 3) -> Runner:
    return Runner(proxy.url, model=None, api_key=None, out=out, concurrency=concurrency, max_tokens=64)


def _key(req: RecordedRequest) -> tuple[str, str]:
    label = {v: k for k, v in N_OF.items()}[int(req.json.get("n") or 1)]
    return label, f"q{_question(req.json)}"


def _lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _assert_each_pair_once(path: Path) -> list[dict[str, Any]]:
    records = report.read(path)
    pairs = Counter((r["strategy"], r["item"]) for r in records)
    assert set(pairs) == {(s.label, i.id) for s in SPECS for i in ITEMS}
    # not only after read's de-duplication: the file itself holds each successful pair once
    raw = Counter((r["strategy"], r["item"]) for r in _lines(path) if not r.get("error"))
    assert all(v == 1 for v in raw.values()), raw
    return records


async def test_one_record_per_pair_with_the_upstreams_tokens(served: tuple[FakeUpstream, ProxyServer],
                                                             tmp_path: Path) -> None:
    fake, proxy = served
    path = await _runner(proxy, tmp_path / "out").run(ITEMS, SPECS)
    assert path == tmp_path / "out" / "results.jsonl"
    lines = _lines(path)
    assert len(lines) == len(path.read_text().splitlines()) == len(ITEMS) * len(SPECS)
    records = _assert_each_pair_once(path)
    calls = fake.completion_calls()
    assert len(calls) == len(records)  # one upstream call per pair: n samples in one request
    spent: dict[tuple[str, str], dict[str, int]] = {}
    for req in calls:
        assert req.usage is not None
        spent[_key(req)] = req.usage
    for r in records:
        usage = spent[(r["strategy"], r["item"])]
        assert r["tokens"] == usage["total_tokens"]
        assert r["prompt_tokens"] == usage["prompt_tokens"]
        assert r["completion_tokens"] == usage["completion_tokens"]
        assert r["calls"] == 1
        assert r["expected"] == next(i.answer for i in ITEMS if i.id == r["item"])
        k = int(r["item"][1:])
        greedy_wrong = r["strategy"] == "passthrough" and k in WRONG_FIRST
        assert r["correct"] == (0.0 if greedy_wrong else 1.0), r
        assert r["answer"] == str(2 * k + 1 if greedy_wrong else 2 * k)
        assert r["wall_s"] >= 0 and "error" not in r
    sc = [r for r in records if r["strategy"] == "self_consistency:n=3"]
    assert all(r["uncertainty"] is not None for r in sc)
    assert {r["uncertainty"] for r in sc if int(r["item"][1:]) in WRONG_FIRST} != {0.0}
    # the requests carried the item's prompt, the runner's max_tokens and the strategy's n
    for req in calls:
        assert req.json["model"] == "fake"
        assert req.json["max_tokens"] == 64
        assert req.json["messages"][-1]["content"] == ITEMS[_question(req.json)].prompt()


async def test_items_go_one_by_one_each_strategy_in_turn(served: tuple[FakeUpstream, ProxyServer],
                                                          tmp_path: Path) -> None:
    """One at a time, the upstream sees every strategy of an item before the next item: a run
    stopped early leaves results paired across strategies."""
    fake, proxy = served
    await _runner(proxy, tmp_path / "out", concurrency=1).run(ITEMS, SPECS)
    seen = [_key(req) for req in fake.completion_calls()]
    assert seen == [(s.label, i.id) for i in ITEMS for s in SPECS]


async def test_resume_after_an_interrupted_run_sends_only_the_missing(served: tuple[FakeUpstream, ProxyServer],
                                                                      tmp_path: Path) -> None:
    fake, proxy = served
    out = tmp_path / "out"
    done = 0
    task: asyncio.Task[Path] | None = None

    def advance() -> None:
        nonlocal done
        done += 1
        if done == 4:
            assert task is not None
            task.cancel()

    task = asyncio.create_task(_runner(proxy, out, concurrency=1).run(ITEMS, SPECS, advance=advance))
    with pytest.raises(asyncio.CancelledError):
        await task
    path = out / "results.jsonl"
    assert len(_lines(path)) == len(completed(path)) == 4
    await asyncio.sleep(0.3)  # a request cut by the cancel may still be arriving
    assert await fake.async_wait_until(lambda: fake.in_flight == 0)
    before = len(fake.completion_calls())

    resumed = 0

    def count() -> None:
        nonlocal resumed
        resumed += 1

    await _runner(proxy, out).run(ITEMS, SPECS, advance=count)
    missing = len(ITEMS) * len(SPECS) - 4
    assert resumed == missing
    assert len(fake.completion_calls()) - before == missing
    _assert_each_pair_once(path)

    # a third run has nothing left to do
    before = len(fake.completion_calls())
    await _runner(proxy, out).run(ITEMS, SPECS)
    assert len(fake.completion_calls()) == before


async def test_resume_after_a_line_cut_midway(served: tuple[FakeUpstream, ProxyServer], tmp_path: Path) -> None:
    fake, proxy = served
    full = await _runner(proxy, tmp_path / "full").run(ITEMS, SPECS)
    lines = full.read_text().splitlines()
    kept, cut = lines[:5], lines[5]
    out = tmp_path / "cut"
    out.mkdir()
    path = out / "results.jsonl"
    path.write_text("\n".join(kept) + "\n" + cut[: len(cut) // 2])  # the process died mid-write
    kept_pairs = {(json.loads(ln)["strategy"], json.loads(ln)["item"]) for ln in kept}
    fake.clear()

    await _runner(proxy, out).run(ITEMS, SPECS)
    sent = {_key(r) for r in fake.completion_calls()}
    assert len(fake.completion_calls()) == len(ITEMS) * len(SPECS) - 5
    assert sent == {(s.label, i.id) for s in SPECS for i in ITEMS} - kept_pairs
    records = _assert_each_pair_once(path)
    assert len(records) == len(ITEMS) * len(SPECS)
    assert path.read_text().endswith("\n")
    assert len(_lines(path)) == len(ITEMS) * len(SPECS)  # only the cut line is unreadable


async def test_errors_are_recorded_and_retried_next_run(served: tuple[FakeUpstream, ProxyServer],
                                                        tmp_path: Path) -> None:
    fake, proxy = served
    specs = SPECS[:1]
    out = tmp_path / "out"
    fake.fail_n = 2  # the next two completion requests fail with 500
    path = await _runner(proxy, out, concurrency=1).run(ITEMS, specs)
    lines = _lines(path)
    assert len(lines) == len(ITEMS)
    failed = [r for r in lines if r.get("error")]
    assert len(failed) == 2
    for r in failed:
        assert "fail_n" in r["error"] or "500" in r["error"], r
        assert "correct" not in r and "tokens" not in r
    failed_ids = {r["item"] for r in failed}
    assert {r["item"] for r in report.read(path)} == {i.id for i in ITEMS} - failed_ids
    assert completed(path) == {("passthrough", i.id) for i in ITEMS} - {("passthrough", i) for i in failed_ids}

    fake.clear()
    await _runner(proxy, out).run(ITEMS, specs)
    assert sorted(f"q{_question(r.json)}" for r in fake.completion_calls()) == sorted(failed_ids)
    records = report.read(path)
    assert sorted(r["item"] for r in records) == sorted(i.id for i in ITEMS)
    assert all("error" not in r for r in records)
    assert len(_lines(path)) == len(ITEMS) + 2  # the failures stay in the file, superseded
