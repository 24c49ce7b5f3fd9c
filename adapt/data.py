"""Self-data augmentation (TT-SI): for each uncertain query the model writes similar new queries;
each question is answered by ``best_of_n`` (or a stronger teacher upstream, TT-D) and kept only
if the verifiers approve the answer. Also the held-out split and the data hash for lineage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapt.config import AdaptConfig
from protocol.errors import SharpenError
from protocol.upstream import UpstreamAPI
from protocol.wire import ChatCompletionRequest
from strategies.answers import extract
from strategies.base import StrategyContext
from strategies.best_of_n import BestOfN, BestOfNOptions
from strategies.chat import first_text

_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*•]|(?:q|question)\s*\d*\s*[:.)])?\s*(.+?)\s*$", re.IGNORECASE)
# What a small model writes around its questions: a preamble ("Sure, here are three:") or an
# answer ("The answer is 36."), neither of which is a question to train on.
_NOT_A_QUESTION = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\b|:$", re.IGNORECASE)


@dataclass
class Example:
    """One training (or held-out) example; ``reference`` is its extracted final answer."""

    task: str
    answer: str
    score: float = 1.0
    origin: int | None = None  # the uncertain query it came from
    reference: str | None = None

    def chat(self) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": self.task}], "answer": self.answer}


def _ctx(upstream: UpstreamAPI, model: str, tenant: str, body: dict[str, Any]) -> StrategyContext:
    return StrategyContext(upstream=upstream, body=body, endpoint="/chat/completions", model=model, tenant=tenant,
                           deadline=time.monotonic() + 600)


async def siblings(upstream: UpstreamAPI, model: str, tenant: str, task: str, k: int) -> list[str]:
    """K new questions like ``task`` (same kind and difficulty, different specifics)."""
    prompt = (f"Here is a question:\n{task}\n\nWrite {k} new questions of the same kind and difficulty, with "
              "different specifics (names, numbers). One question per line, no answers, no numbering.")
    ctx = _ctx(upstream, model, tenant, {})
    data = await ctx.chat({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 80 * k,
                           "temperature": 0.8}, purpose="synthesize")
    text = first_text(data)
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        q = m.group(1) if m else ""
        if len(q) > 8 and not _NOT_A_QUESTION.search(q) and q.lower() != task.lower() and q not in out:
            out.append(q)
    return out[:k]


async def answer(upstream: UpstreamAPI, model: str, tenant: str, task: str, settings: AdaptConfig,
                 origin: int | None) -> Example | None:
    """The best verified answer to ``task`` from best_of_n, or None if the verifiers reject all."""
    body = {"model": model, "messages": [{"role": "user", "content": task}], "max_tokens": 384}
    req = ChatCompletionRequest.model_validate(body)
    # prose candidates only: a kept example is a written answer the verifiers approved, not a program
    strat = BestOfN(BestOfNOptions(n=settings.bon_n, verifiers=settings.verifiers, pal=0))
    try:
        result = await strat.run(req, _ctx(upstream, model, tenant, body))
    except SharpenError:
        return None
    if not result.candidates or result.response is None:
        return None
    best = max(result.candidates, key=lambda c: (c.scores.get("verifiers", 0), c.scores.get("agreement", 0)))
    score = best.scores.get("verifiers", 0.0)
    # An LLM verifier's explicit rejection vetoes the answer: with the default verifiers,
    # agreement alone (four candidates repeating one wrong answer) would otherwise reach 0.5.
    vetoed = any(v.get("approved") is False for k, v in best.verdicts.items() if k.startswith("aspect:"))
    if score < settings.min_verifier_score or vetoed or not best.content.strip():
        return None
    return Example(task=task, answer=best.content, score=score, origin=origin, reference=extract(best.content))


async def synthesize(upstream: UpstreamAPI, model: str, tenant: str, queries: list[tuple[int, str]],
                     settings: AdaptConfig, *, answerer: UpstreamAPI | None = None,
                     answer_model: str | None = None, concurrency: int = 4) -> list[Example]:
    """Examples for every query and its siblings that the verifiers approve."""
    sem = asyncio.Semaphore(concurrency)

    async def expand(origin: int, task: str) -> list[tuple[int, str]]:
        async with sem:
            try:
                sibs = await siblings(upstream, model, tenant, task, settings.siblings)
            except SharpenError:
                sibs = []
        return [(origin, task)] + [(origin, s) for s in sibs]

    tasks = [t for group in await asyncio.gather(*(expand(o, t) for o, t in queries)) for t in group]

    async def solve(origin: int, task: str) -> Example | None:
        async with sem:
            return await answer(answerer or upstream, answer_model or model, tenant, task, settings, origin)

    found = await asyncio.gather(*(solve(o, t) for o, t in tasks))
    return [e for e in found if e is not None]


def split(examples: list[Example], holdout: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split (at least one example each side when there are two or more)."""
    items = list(examples)
    random.Random(seed).shuffle(items)
    n = round(len(items) * holdout)
    if len(items) >= 2:
        n = min(max(n, 1), len(items) - 1)
    return items[n:], items[:n]


def data_hash(examples: list[Example]) -> str:
    blob = json.dumps([asdict(e) for e in examples], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_job_files(job_dir: Path, examples: list[Example], heldout: list[Example]) -> Path:
    """``train.jsonl`` (chat examples, in training order) and ``heldout.jsonl`` for the job; returns the first."""
    job_dir.mkdir(parents=True, exist_ok=True)
    ex_file = job_dir / "train.jsonl"
    ex_file.write_text("".join(json.dumps(e.chat()) + "\n" for e in examples))
    (job_dir / "heldout.jsonl").write_text("".join(json.dumps(e.__dict__) + "\n" for e in heldout))
    return ex_file


def hyperparameters(s: AdaptConfig, *, curriculum: bool) -> dict[str, Any]:
    """The trainer's hyperparameters; ``curriculum`` keeps the examples' (easy-to-hard) order."""
    return {"rank": s.rank, "alpha": s.alpha, "target_modules": s.target_modules, "learning_rate": s.learning_rate,
            "epochs": s.epochs, "max_steps": s.max_steps, "batch_size": s.batch_size, "threads": s.threads,
            "curriculum": curriculum, "dtype": s.train_dtype}
