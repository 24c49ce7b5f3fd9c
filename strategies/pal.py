"""Program-aided candidates (PAL, Gao et al., arXiv 2211.10435): the model writes Python that
prints the answer; the program runs in the sandbox; what it printed is the candidate's answer.

A program that cannot be found, fails, prints nothing or times out abstains (answer None): a
sandbox failure is never an error of the request. The sandbox is reached through ``execute``
only (a thin adapter over ``strategies.sandbox``), so its hardening can change underneath.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import UpstreamStatusError, UpstreamTimeout
from protocol.wire import ChatCompletionRequest
from strategies import sampling
from strategies.answers import FORM_NO_ANSWER, FORM_OK, extract
from strategies.base import Candidate, StrategyContext
from strategies.sandbox import SandboxLimits, extract_code, run_python
from strategies.stream_join import STREAM_OPTIONS, StreamedChoices, sse_events

PAL_INSTRUCTION = ("\n\nDo not solve it by hand. Write a short Python program that computes the answer "
                   "and prints only the final answer. Reply with a single ```python code block.")


@dataclass(frozen=True)
class Execution:
    """How a program ran: ``status`` is ok / no_code / failed / timeout / no_output /
    sandbox_error; ``answer`` the normalised last printed line (None unless ok)."""

    status: str
    answer: str | None = None
    output: str = ""


async def execute(reply: str, *, wall_s: float = 5.0, cpu_s: int = 3) -> Execution:
    """Runs the reply's Python block in the sandbox; never raises for the code's or the
    sandbox's faults (cancellation still propagates)."""
    code = extract_code(reply)
    if code is None:
        return Execution("no_code")
    try:
        res = await run_python(code, SandboxLimits(wall_s=wall_s, cpu_s=cpu_s))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the sandbox itself failed: the candidate abstains
        return Execution("sandbox_error", output=str(exc)[:200])
    if res.timed_out:
        return Execution("timeout")
    if not res.ok:
        return Execution("failed", output=res.stderr.strip()[-200:])
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.strip()]
    if not lines:
        return Execution("no_output")
    return Execution("ok", extract(lines[-1]), res.stdout.strip()[-200:])


def applicable(request: ChatCompletionRequest) -> bool:
    """Whether programs can answer this request: not when it wants tool calls or JSON (a
    printed line is neither), so best_of_n and auto draw prose candidates only there."""
    if (request.model_extra or {}).get("tools"):
        return False
    rf = request.response_format or {}
    return rf.get("type") not in ("json_object", "json_schema")


def pal_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the PAL instruction appended to the last user turn (a string
    content; content parts get a text part appended)."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") != "user":
            continue
        c = m.get("content")
        if isinstance(c, str):
            m["content"] = c + PAL_INSTRUCTION
        elif isinstance(c, list):
            m["content"] = [*c, {"type": "text", "text": PAL_INSTRUCTION.strip()}]
        break
    return out


def as_reply(reply: str, run: Execution) -> str:
    """The text to return when a program's answer wins: its code, then the stated answer."""
    return f"{reply.rstrip()}\n\nThe program printed {run.output.splitlines()[-1] if run.output else ''}." \
           f"\nThe answer is {run.answer}."


def _body(request: ChatCompletionRequest, ctx: StrategyContext, k: int, temperature: float) -> dict[str, Any]:
    body = {key: v for key, v in ctx.body.items() if key not in ("stream", "stream_options")}
    body.update(n=k, temperature=temperature if not request.temperature else request.temperature, logprobs=True,
                top_logprobs=max(request.top_logprobs or 0, sampling.TOP_LOGPROBS),
                messages=pal_messages(list(body.get("messages") or [])))
    return body


def _programs(data: dict[str, Any], cands: list[Candidate],
              runs: list[Execution]) -> tuple[dict[str, Any], list[Candidate]]:
    """The candidates (of ``data``'s choices, in index order) made program candidates, each
    answering what its program printed."""
    choices = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
    for c, run, ch in zip(cands, runs, choices, strict=True):
        c.program = True
        c.answer = run.answer
        c.form = FORM_OK if run.answer is not None else FORM_NO_ANSWER
        c.verdicts["execution_run"] = {"status": run.status, "output": run.output[-200:]}
        if run.answer is not None:
            c.content = as_reply(c.content, run)
            ch["message"] = {**(ch.get("message") or {}), "content": c.content}
    data["choices"] = choices
    return data, cands


async def draw(request: ChatCompletionRequest, ctx: StrategyContext, k: int, temperature: float,
               *, start: int) -> tuple[dict[str, Any], list[Candidate]]:
    """``k`` program-aided candidates from one ``n=k`` call, each program run (concurrently) in
    the sandbox; indices from ``start``. A candidate's answer is what its program printed (None:
    it abstains); its reply, should it be returned, is the code followed by that answer."""
    data = await ctx.chat(_body(request, ctx, k, temperature), purpose="candidates:pal")
    cands = sampling.candidates(data, request, start=start)
    runs = await asyncio.gather(*(execute(c.content) for c in cands))
    return _programs(data, cands, list(runs))


async def draw_until(request: ChatCompletionRequest, ctx: StrategyContext, k: int, temperature: float,
                     *, start: int, cutoff: Callable[[], float | None],
                     notes: list[str]) -> tuple[dict[str, Any], list[Candidate]]:
    """``draw``, streamed: each program runs the moment its choice finishes, and once
    ``time.monotonic()`` passes ``cutoff()`` (None: not known yet) with at least one finished
    program having printed an answer, the call is closed (vLLM stops generating the rest) and
    the unfinished programs are dropped. Usage counts the tokens the closed call had sent. An
    upstream that refuses the streamed call with a 400 (not vLLM: ``continuous_usage_stats`` is
    its own) gets the plain ``draw`` instead."""
    body = _body(request, ctx, k, temperature) | {"stream": True, "stream_options": dict(STREAM_OPTIONS)}
    started, got, runs = time.monotonic(), StreamedChoices(), {}
    reply, cut, refused = None, False, None
    try:
        async with asyncio.timeout(max(ctx.remaining(), 0.0)):
            try:
                reply = await ctx.open_stream(body, purpose="candidates:pal")
            except UpstreamStatusError as exc:
                if exc.http_status != 400:
                    raise
                refused = exc.message[:200]
            if reply is not None:
                async with contextlib.aclosing(sse_events(reply.chunks())) as events:
                    async for event in events:
                        for i in got.feed(event):
                            runs[i] = asyncio.ensure_future(execute("".join(got.texts.get(i, []))))
                        at = cutoff()
                        if at is not None and time.monotonic() >= at and len(got.finish) < k and any(
                                t.done() and not t.cancelled() and t.result().answer is not None
                                for t in runs.values()):
                            cut = True
                            break
    except BaseException as exc:
        for t in runs.values():
            t.cancel()
        timeout = isinstance(exc, TimeoutError)
        ctx.record("candidates:pal", body, got.usage(), started,
                   error="deadline" if timeout else (str(exc)[:200] or type(exc).__name__))
        if timeout:
            raise UpstreamTimeout("the request's deadline passed while waiting for the upstream") from None
        raise
    finally:
        if reply is not None:
            await reply.close()  # closed early: vLLM aborts the choices still running
    ctx.record("candidates:pal", body, None if refused else got.usage(), started, error=refused)
    if refused is not None:  # recorded above as a failed call; the plain call records its own
        notes.append("the upstream refused a streamed program call: drawn without the program deadline")
        return await draw(request, ctx, k, temperature, start=start)
    done = sorted(runs)
    if cut:
        notes.append(f"programs: {len(done)} of {k} finished by the program deadline; the rest were not waited for")
    data = got.completion(done)
    cands = sampling.candidates(data, request, start=start)
    return _programs(data, cands, list(await asyncio.gather(*(runs[i] for i in done))))


async def with_prose(request: ChatCompletionRequest, ctx: StrategyContext, n: int, k: int, temperature: float,
                     notes: list[str], *, wait: float | None = None) -> tuple[dict[str, Any], list[Candidate]]:
    """``n`` candidates, ``k`` of them program-aided: the prose call and the program call at once
    (they are independent: one round trip, not two), the programs indexed after the prose. If one
    call fails, the other is cancelled (its upstream work is not wanted either). ``wait``: stop
    waiting for unfinished programs ``wait`` times the prose call's time after the start, once a
    finished one has printed an answer (``draw_until``)."""
    started, prose_end = time.monotonic(), []
    prose = sampling.sample(request, ctx, n - k, temperature, notes) if n > k else None
    tasks = [asyncio.ensure_future(prose)] if prose is not None else []
    if tasks and wait is not None:
        tasks[0].add_done_callback(lambda _: prose_end.append(time.monotonic()))

    def cutoff() -> float | None:
        return started + wait * (prose_end[0] - started) if prose_end and wait is not None else None

    programs = None
    if k:
        programs = (draw_until(request, ctx, k, temperature, start=n - k, cutoff=cutoff, notes=notes)
                    if wait is not None and prose is not None else draw(request, ctx, k, temperature, start=n - k))
        tasks.append(asyncio.ensure_future(programs))
    try:
        got = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    if prose is None or programs is None:
        return got[0]
    (upstream, cands), (extra, progs) = got
    return merge(upstream, extra), cands + progs


def merge(upstream: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One upstream-shaped answer holding both answers' choices, ``extra``'s indexed after."""
    base = len(upstream["choices"])
    more = sorted(extra["choices"], key=lambda c: int(c.get("index", 0)))
    return {**upstream, "choices": [*upstream["choices"], *(dict(c, index=base + i) for i, c in enumerate(more))]}


def leader(printed: list[str | None], min_votes: int) -> str | None:
    """The answer at least ``min_votes`` programs printed and more than printed any other, else
    None (a tie is not settled); programs that abstained (None) do not vote."""
    counts = Counter(a for a in printed if a is not None).most_common(2)
    if not counts or counts[0][1] < min_votes or (len(counts) > 1 and counts[1][1] == counts[0][1]):
        return None
    return counts[0][0]
