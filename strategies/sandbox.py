"""Runs model-written Python in a separate, locked-down process (CRITIC's tool feedback).

Layers, each enough to stop the common case, together defence in depth:
- a separate process (never the server's), in its own process group, killed on timeout;
- resource limits: CPU seconds, address space, file size, open files;
- a fresh network namespace with no interfaces where the kernel allows one (root, or
  unprivileged user namespaces), so sockets cannot reach anything;
- an audit hook installed before the code runs that refuses sockets, subprocesses, writes
  outside its temporary directory, and loading native libraries;
- ``-I`` (isolated mode: no environment variables, no user site), an empty environment, and the
  temporary directory as working directory, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

# Every fence, whatever its language, so a ```bash block is never paired with the next fence.
_CODE_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON = frozenset({"python", "py", "python3"})

# Executed first in the child: installs the audit hook, then runs the user's file.
_BOOTSTRAP = r"""
import sys, os
_root = os.path.realpath(sys.argv[1])
def _hook(event, args):
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"):
        raise PermissionError("network access is disabled in the sandbox")
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "ctypes.dlopen", "ctypes.dlsym", "pty.spawn"):
        raise PermissionError(f"{event} is disabled in the sandbox")
    if event == "open" and len(args) > 1:
        path, mode = args[0], args[1]
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if not isinstance(mode, str):  # os.open: mode is None, the flags say it
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if writing and isinstance(path, (str, bytes)):
            p = os.path.realpath(path if isinstance(path, str) else path.decode())
            if not (p == _root or p.startswith(_root + os.sep)):
                raise PermissionError(f"writing {p} is outside the sandbox")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.symlink", "os.link",
                 "shutil.rmtree", "os.truncate"):
        # rename/replace/link/symlink name two paths: the destination must stay inside too
        for p in args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]:
            if isinstance(p, (str, bytes)):
                p = os.path.realpath(p if isinstance(p, str) else p.decode())
                if not (p == _root or p.startswith(_root + os.sep)):
                    raise PermissionError(f"{event} on {p} is outside the sandbox")
sys.addaudithook(_hook)
del _hook
_src = sys.stdin.read()
sys.stdin = open(os.devnull)
sys.argv = ["main.py"]
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__"})
"""

try:  # loaded here, in the parent: the forked child must not import or allocate
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``wall_s`` bounds the whole run; ``cpu_s`` the CPU it may burn."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    output_chars: int = 4000
    file_mb: int = 8


@dataclass
class SandboxResult:
    """What the code printed, and how it ended."""

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def summary(self, limit: int = 1500) -> str:
        if self.timed_out:
            return "The code did not finish within the time limit and was killed."
        if self.returncode == -signal.SIGXCPU:
            return "The code did not finish within the time limit and was killed (CPU time)."
        out = self.stdout.strip()[-limit:]
        err = self.stderr.strip()[-limit:]
        if self.returncode == 0:
            return f"The code ran. Output:\n{out or '(nothing printed)'}"
        return f"The code failed (exit {self.returncode}). Output:\n{out}\nError:\n{err}"


def extract_code(text: str) -> str | None:
    """The last fenced Python block in a model's answer, if any."""
    blocks = _CODE_BLOCK.findall(text or "")
    # A block tagged Python wins over an untagged one (often the output shown after the code).
    tagged = [code for lang, code in blocks if lang.lower() in _PYTHON]
    bare = [code for lang, code in blocks if not lang]
    found = tagged or bare
    return found[-1].strip() if found else None


def _isolate(limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec. The namespace comes first: after fork the child
    still has the server's (large) address space, so nothing may allocate once RLIMIT_AS is set;
    the limits bind the fresh interpreter that exec starts."""
    os.setsid()
    # A new network namespace has only a downed loopback: nothing is reachable. Without root, a
    # user namespace first makes that allowed where the kernel permits it; else the audit hook
    # still refuses sockets.
    if _LIBC is not None and _LIBC.unshare(_CLONE_NEWNET) != 0:
        _LIBC.unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    mem = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = limits.file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


async def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Runs ``code`` in the sandbox and returns its output; never raises for the code's faults."""
    limits = limits or SandboxLimits()
    workdir = tempfile.mkdtemp(prefix="sharpen-sandbox-")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", _BOOTSTRAP, workdir,
            cwd=workdir, env={"PYTHONIOENCODING": "utf-8", "HOME": workdir, "TMPDIR": workdir},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=lambda: _isolate(limits),
        )
        timed_out = False
        try:
            async with asyncio.timeout(limits.wall_s):
                out, err = await proc.communicate(code.encode())
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        n = limits.output_chars
        return SandboxResult(out.decode("utf-8", "replace")[-n:], err.decode("utf-8", "replace")[-n:],
                             None if timed_out else proc.returncode, timed_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
