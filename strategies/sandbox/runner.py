"""Starting, watching and ending one sandboxed run.

The run is bubblewrap (see ``policy``) started in its own process group; its PID namespace's
init dies with it (``--die-with-parent``), and the kernel then kills everything in the
namespace, so killing the group ends the whole tree, setsid'd grandchildren included. Output is
read as it comes, keeping only a bounded tail of each stream; past ``output_max_bytes`` the run
is stopped, so an output bomb costs the server a fixed amount of memory and little CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from strategies.sandbox import policy
from strategies.sandbox.result import SandboxLimits, SandboxResult, SandboxUnavailable

_CHUNK = 65536
_PROBE_OK = False


class _Tail:
    """The last ``keep`` bytes of a stream, and how many came in all."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.buf = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.buf += chunk
        if len(self.buf) > self.keep:
            del self.buf[: len(self.buf) - self.keep]

    def text(self, chars: int) -> str:
        s = self.buf.decode("utf-8", "replace")
        cut = self.total - len(self.buf)
        if len(s) > chars:
            cut += len(s[:-chars].encode("utf-8", "replace"))
            s = s[-chars:]
        return f"[... {cut} bytes cut ...]\n{s}" if cut > 0 else s


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _reap(pid: int) -> None:
    """Kills what is left of the group and waits (up to 5 s) until it is gone, so nothing of
    a run outlives ``run_python``: bubblewrap's init in the PID namespace exits just after the
    monitor the server waits for."""
    for _ in range(500):  # a loaded machine can take a while to tear a killed tree down
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        await asyncio.sleep(0.01)


async def _start(limits: SandboxLimits) -> asyncio.subprocess.Process:
    await asyncio.to_thread(policy.runtime_files)  # cached; ldd runs once per process, off the loop
    cmd = policy.build(limits)  # fast, and holds descriptors: not in a thread a cancellation would orphan
    try:
        kw: dict[str, object] = {}
        if cmd.uid is not None:
            kw = {"user": cmd.uid, "group": cmd.gid, "extra_groups": []}
        return await asyncio.create_subprocess_exec(
            *cmd.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={}, start_new_session=True, pass_fds=cmd.fds,
            **kw,  # type: ignore[arg-type]
        )
    except OSError as e:  # bubblewrap gone or not executable since it was found
        raise SandboxUnavailable(f"cannot start bubblewrap: {e}") from e
    finally:
        cmd.close()


async def _execute(code: str, limits: SandboxLimits, deadline: float) -> SandboxResult:
    """One run, ended at ``deadline`` (monotonic) at the latest, start-up included."""
    try:
        async with asyncio.timeout_at(deadline):
            proc = await _start(limits)
    except TimeoutError:
        return SandboxResult("", "", None, timed_out=True)
    assert proc.stdin and proc.stdout and proc.stderr
    keep = limits.output_chars * 4
    out, err = _Tail(keep), _Tail(keep)
    exceeded = False

    async def drain(stream: asyncio.StreamReader, tail: _Tail) -> None:
        nonlocal exceeded
        while chunk := await stream.read(_CHUNK):
            tail.add(chunk)
            if out.total + err.total > limits.output_max_bytes and not exceeded:
                exceeded = True
                _kill(proc.pid)

    async def feed(stdin: asyncio.StreamWriter) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(code.encode("utf-8", "replace"))
            await stdin.drain()
            stdin.close()

    tasks = [asyncio.create_task(feed(proc.stdin)), asyncio.create_task(drain(proc.stdout, out)),
             asyncio.create_task(drain(proc.stderr, err))]
    timed_out = False
    killed_at: float | None = None
    try:
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*tasks)
                await proc.wait()
        except TimeoutError:
            timed_out = True
            killed_at = time.monotonic()
            _kill(proc.pid)
        # after a kill every writer is gone, so the pipes end at once; bounded anyway
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks, return_exceptions=True)
            await proc.wait()
    except BaseException:  # cancelled (the client went away) or stuck: the tree goes first
        _kill(proc.pid)
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(5):
                await proc.wait()
                await _reap(proc.pid)
        raise
    await _reap(proc.pid)
    kill_s = None if killed_at is None else time.monotonic() - killed_at
    rc = None if timed_out else proc.returncode
    if rc is not None and rc > 128:  # bubblewrap reports a child killed by signal N as 128 + N
        rc = -(rc - 128)
    return SandboxResult(out.text(limits.output_chars), err.text(limits.output_chars), rc, timed_out,
                         exceeded and not timed_out, kill_s)


async def probe() -> None:
    """Runs a trivial program once per process; raises SandboxUnavailable (with bubblewrap's
    reason) if the isolation cannot be set up here, e.g. no user namespaces."""
    global _PROBE_OK
    if _PROBE_OK:
        return
    r = await _execute("print('ok')", SandboxLimits(cpu_s=10), time.monotonic() + 30)
    if r.stdout.strip() != "ok" or r.returncode != 0:
        raise SandboxUnavailable(f"the sandbox cannot start here: {(r.stderr or r.stdout).strip()[-300:]}")
    _PROBE_OK = True


async def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Runs ``code`` in the sandbox and returns its output; never raises for the code's faults.
    Raises SandboxUnavailable if the sandbox cannot be set up (the code is then not run). The
    wall limit counts from this call: the one-time probe and the start-up are inside it."""
    limits = limits or SandboxLimits()
    deadline = time.monotonic() + limits.wall_s
    try:
        async with asyncio.timeout_at(deadline):
            await probe()
    except TimeoutError:
        return SandboxResult("", "", None, timed_out=True)
    return await _execute(code, limits, deadline)
