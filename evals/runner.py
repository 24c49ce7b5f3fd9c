"""Runs every item through every strategy against a sharpen server; one JSONL line per result,
written as it finishes, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from evals import checkers
from evals.datasets import Item
from strategies.answers import extract


@dataclass
class StrategySpec:
    """``self_consistency:n=8`` -> label, name and options."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def body(self) -> str | dict[str, Any]:
        return {"name": self.name, **self.options} if self.options else self.name


def _value(v: str) -> Any:
    if "+" in v:
        return [_value(x) for x in v.split("+")]
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


_LIST_OPTIONS = frozenset({"verifiers"})


def _option(key: str, raw: str) -> Any:
    v = _value(raw)
    return [v] if key in _LIST_OPTIONS and not isinstance(v, list) else v


def parse_strategies(text: str) -> list[StrategySpec]:
    """``passthrough,self_consistency:n=8,best_of_n:n=8,verifiers=approval+agreement``: a token
    without ``:`` but with ``=`` adds an option to the strategy before it."""
    specs: list[StrategySpec] = []
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        if ":" not in tok and "=" in tok and specs:
            k, _, v = tok.partition("=")
            specs[-1].options[k] = _option(k, v)
            specs[-1].label += "," + tok
            continue
        name, _, opts = tok.partition(":")
        spec = StrategySpec(label=tok, name=name)
        for part in filter(None, opts.split(";")):
            k, _, v = part.partition("=")
            spec.options[k] = _option(k, v)
        specs.append(spec)
    return specs


def completed(path: Path) -> set[tuple[str, str]]:
    done: set[tuple[str, str]] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption: that item runs again
            if not r.get("error"):
                done.add((r["strategy"], r["item"]))
    return done


def _end_line(path: Path) -> None:
    """A line cut by an interruption gets its newline, so the next record is not glued onto it."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


class Runner:
    """Sends items to ``base_url`` (a sharpen ``/v1``) with a strategy each, ``concurrency`` at once."""

    def __init__(self, base_url: str, *, model: str | None, api_key: str | None, out: Path, concurrency: int = 4,
                 max_tokens: int = 512, timeout: float = 900.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.out = out
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.timeout = timeout
        self._lock = asyncio.Lock()

    async def run(self, items: list[Item], specs: list[StrategySpec],
                  advance: Callable[[], None] | None = None) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "results.jsonl"
        done = completed(path)
        _end_line(path)
        # item by item, each strategy in turn: a run stopped early still leaves paired results
        todo = [(s, i) for i in items for s in specs if (s.label, i.id) not in done]
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
            model = self.model or await self._default_model(client)

            async def one(spec: StrategySpec, item: Item) -> None:
                async with sem:
                    rec = await self._ask(client, model, spec, item)
                async with self._lock:
                    with path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                if advance:
                    advance()

            await asyncio.gather(*(one(s, i) for s, i in todo))
        return path

    async def _default_model(self, client: httpx.AsyncClient) -> str:
        r = await client.get(self.base_url + "/models")
        r.raise_for_status()
        cards = [c for c in r.json()["data"] if not c.get("parent")]
        return str(cards[0]["id"])

    async def _ask(self, client: httpx.AsyncClient, model: str, spec: StrategySpec, item: Item) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": item.prompt()}],
                                "max_tokens": self.max_tokens, "temperature": 0.0, "strategy": spec.body(),
                                "trace": True}
        rec: dict[str, Any] = {"strategy": spec.label, "item": item.id, "expected": item.answer}
        t0 = time.perf_counter()
        try:
            r = await client.post(self.base_url + "/chat/completions", json=body)
            data = r.json()
            if r.status_code != 200:
                raise RuntimeError(str(data.get("error", data))[:300])
        except Exception as exc:
            rec.update(error=f"{type(exc).__name__}: {exc}"[:300], wall_s=time.perf_counter() - t0)
            return rec
        text = str(data["choices"][0]["message"].get("content") or "")
        usage = data.get("usage") or {}
        sh = data.get("sharpen") or {}
        trace = sh.get("trace") or {}
        rec.update(
            correct=await checkers.score(item, text), answer=extract(text), text=text[-400:],
            tokens=int(usage.get("total_tokens") or 0), prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0), calls=int(sh.get("upstream_calls") or 1),
            uncertainty=sh.get("uncertainty"), wall_s=round(time.perf_counter() - t0, 3))
        if trace.get("candidates") and item.checker != "code":  # per candidate, for ``sharpen calibrate --weights``
            rec["candidates"] = [
                {"answer": c.get("answer"),
                 "scores": {k.removeprefix("aspect:"): v.get("score") for k, v in (c.get("verdicts") or {}).items()
                            if isinstance(v, dict) and "score" in v},
                 "correct": (await checkers.score(item, f"The answer is {c['answer']}.")
                             if c.get("answer") is not None else 0.0)}
                for c in trace["candidates"]]
        if "probe_answer" in trace:  # auto: what answering from the probe alone would have scored
            calls = trace.get("calls") or []
            rec.update(escalated=bool(trace.get("escalated")), probe_agreement=trace.get("probe_agreement"),
                       probe_tokens=int(((calls[0] if calls else {}).get("usage") or {}).get("total_tokens") or 0),
                       probe_correct=await checkers.score(item, f"The answer is {trace.get('probe_answer')}.")
                       if trace.get("probe_answer") is not None else 0.0)
        return rec
