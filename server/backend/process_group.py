"""A child process group on Linux: a free port for it, whether it lives, signals, its log's tail."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections import deque
from pathlib import Path

_LOG_TAIL_LINES = 40


def free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS may hand it out again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Run as ``python -c _TIE <parent pid> <argv...>``: asks the kernel to send SIGTERM when the
# parent goes (prctl PR_SET_PDEATHSIG = 1, kept across execve), then becomes argv. Done in the
# child rather than in a preexec_fn, which is unsafe in a process with threads.
_TIE = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)  # the parent is already gone\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def tied_to_parent(argv: list[str], python: str = sys.executable) -> list[str]:
    """``argv`` run so that the kernel sends it SIGTERM when this process dies, even by SIGKILL,
    which no handler or ``atexit`` of ours sees. The signal follows the thread that spawned the
    child, so spawn from the thread that lives as long as the child should (the event loop's).
    Linux only: elsewhere ``argv`` unchanged."""
    if not sys.platform.startswith("linux"):
        return argv
    return [python, "-c", _TIE, str(os.getpid()), *argv]


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process remains in the process group ``pgid``.

    ``killpg(pgid, 0)`` alone is not enough: orphaned grandchildren that exited stay in the group
    as zombies when PID 1 of a container does not reap them, and would look alive forever.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    return bool(group_members(pgid))


def group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes in process group ``pgid``, read from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Sends ``sig`` to the process group ``pgid``, if it is still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # vLLM's progress bars redraw with carriage returns; keep the last state of each line.
    tail: deque[str] = deque(maxlen=lines)
    for line in data.split("\n"):
        tail.append(line.rstrip("\r").rsplit("\r", 1)[-1])
    return "\n".join(tail)
