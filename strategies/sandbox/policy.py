"""What the sandbox may see and use: the bubblewrap command line, built from the limits.

Namespaces: all of them new (``--unshare-all``: user, PID, mount, IPC, UTS, network, cgroup),
no nested user namespaces (``--disable-userns``), no capabilities (``--cap-drop ALL``), a new
session (no terminal to inject into), killed with its parent (``--die-with-parent``).

Filesystem, read-only except /tmp: an empty tmpfs root holding only the Python runtime (the
interpreter, its standard library, and the shared libraries ``ldd`` says they load), a fresh
/proc of the new PID namespace, a minimal /dev, and a size-capped tmpfs /tmp as working and home
directory. No /etc, no home, no data directory, no host /proc or /sys, no shell or other binary.

When the server is root, bubblewrap runs as uid 65534 outside, so that a kernel bug in the
namespaces does not hand out root and RLIMIT_NPROC binds (root is exempt from it). That needs the
runtime's directories to be traversable by others; when they are not (a pyenv under /root, as on
this project's machines), bubblewrap keeps the server's root uid outside (still uid 1000 inside
its own user namespace, with no capabilities). RLIMIT_NPROC does not bind a root uid, so there
process creation rests on the seccomp filter (refused unless ``allow_fork``, which no request
can set) and on the wall limit, which kills the tree.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field

from strategies.sandbox.result import SandboxLimits, SandboxUnavailable
from strategies.sandbox.seccomp import SeccompUnavailable, filter_fd

# The uid bubblewrap runs as when the server is root and the runtime is readable by others.
OUTER_UID = OUTER_GID = 65534
INNER_UID = INNER_GID = 1000
MARKER = "sharpen-sandbox"  # in every sandbox's argv, so tests can find leftovers

_LDD_PATH = re.compile(r"(?:=>\s*|^\s*)(/\S+)\s+\(0x", re.MULTILINE)

# Runs inside before the model's code: applies the limits (which the code cannot raise: raising a
# hard limit needs CAP_SYS_RESOURCE outside), then runs the code read from stdin.
BOOTSTRAP = r"""
import os, resource, sys
cpu, mem, nproc, fsize, nofile = map(int, sys.argv[1].split(","))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
_src = sys.stdin.buffer.read().decode("utf-8", "replace")
sys.stdin = open(os.devnull)
sys.argv = ["main.py"]
del os, resource, cpu, mem, nproc, fsize, nofile
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class Command:
    """A ready bubblewrap invocation: argv, the descriptors it inherits (closed after the start),
    and the uid/gid to start it as (None: the server's own)."""

    argv: list[str]
    fds: list[int] = field(default_factory=list)
    uid: int | None = None
    gid: int | None = None

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@functools.cache
def runtime_files() -> tuple[str, str, tuple[str, ...]]:
    """(interpreter, standard library directory, shared libraries) of the running Python."""
    exe = os.path.realpath(sys.executable)
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    dynload = os.path.join(stdlib, "lib-dynload")
    exts = sorted(os.path.join(dynload, f) for f in os.listdir(dynload) if f.endswith(".so"))
    ldd = shutil.which("ldd")
    if ldd is None:
        raise SandboxUnavailable("ldd is not installed: cannot tell which libraries Python needs")
    out = subprocess.run([ldd, exe, *exts], capture_output=True, text=True, timeout=60).stdout
    libs = sorted({p for p in _LDD_PATH.findall(out) if os.path.exists(p)})
    return exe, stdlib, tuple(libs)


def _public(path: str) -> bool:
    """Whether others can read ``path`` and traverse every directory above it."""
    st = os.stat(path)
    if not st.st_mode & 0o004:
        return False
    d = os.path.dirname(path)
    while True:
        if not os.stat(d).st_mode & 0o001:
            return False
        if d == "/":
            return True
        d = os.path.dirname(d)


def bwrap_path() -> str:
    path = shutil.which("bwrap") or next((p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.path.exists(p)), None)
    if path is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed: code execution is refused "
                                 "(install the Debian package 'bubblewrap')")
    return path


def build(limits: SandboxLimits) -> Command:
    """The command that runs the bootstrap under bubblewrap with ``limits``. Raises
    SandboxUnavailable when something the isolation needs is missing."""
    bwrap = bwrap_path()
    exe, stdlib, libs = runtime_files()
    cmd = Command(argv=[bwrap])
    if os.geteuid() == 0 and all(_public(p) for p in (exe, stdlib, *libs)):
        cmd.uid, cmd.gid = OUTER_UID, OUTER_GID
    try:
        try:
            seccomp = filter_fd(limits.allow_fork)
        except SeccompUnavailable as e:
            raise SandboxUnavailable(f"cannot build the seccomp filter: {e}") from e
        cmd.fds.append(seccomp)
        a = cmd.argv
        a += ["--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(INNER_UID), "--gid", str(INNER_GID),
              "--hostname", MARKER, "--die-with-parent", "--new-session", "--cap-drop", "ALL",
              "--clearenv", "--setenv", "PYTHONIOENCODING", "utf-8", "--setenv", "HOME", "/tmp",
              "--setenv", "TMPDIR", "/tmp", "--setenv", "LC_CTYPE", "C.UTF-8"]
        for path in (exe, stdlib, *libs):
            a += ["--ro-bind", path, path]
        a += ["--proc", "/proc", "--dev", "/dev",
              "--perms", "1777", "--size", str(limits.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
              "--remount-ro", "/", "--chdir", "/tmp", "--seccomp", str(seccomp)]
        rl = ",".join(str(v) for v in (limits.cpu_s, limits.memory_mb * 1024 * 1024, limits.max_processes,
                                       limits.file_mb * 1024 * 1024, limits.max_open_files))
        a += [exe, "-I", "-S", "-B", "-c", BOOTSTRAP, rl, MARKER]
    except BaseException:
        cmd.close()
        raise
    return cmd
