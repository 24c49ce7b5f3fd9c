"""The seccomp filter (strategies/sandbox/seccomp.py): refused syscalls fail inside the sandbox
with the errno the filter sets, while the same calls succeed outside it (so the checks can fail),
and threads still work where processes are refused."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from strategies.sandbox import SandboxLimits, run_python
from strategies.sandbox.seccomp import compile_filter

pytestmark = pytest.mark.timeout(60)

# Raw syscalls through libc, each printed as NAME=result/errno. Numbers are x86_64's.
PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(name, nr, *args):
    rc = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    print(f"{name}={rc}/{ctypes.get_errno() if rc < 0 else 0}")
call("ptrace", 101, 0, 0, 0, 0)                 # PTRACE_TRACEME
call("keyctl", 250, 0, -3, 0)                   # KEYCTL_GET_KEYRING_ID, the session keyring
call("socket_inet", 41, 2, 1, 0)               # AF_INET, SOCK_STREAM
call("socket_unix", 41, 1, 1, 0)               # AF_UNIX stays allowed
call("unshare_net", 272, 0x40000000)
call("mount", 165, 0, 0, 0, 0, 0)
call("bpf", 321, 0, 0, 0)
call("io_uring_setup", 425, 1, 0)
call("userfaultfd", 323, 0)
call("perf_event_open", 298, 0, 0, -1, -1, 0)
call("mknodat", 259, -100, 0, 0o10600, 0)      # a FIFO
"""
DENIED = {"ptrace": 1, "keyctl": 1, "socket_inet": 13, "unshare_net": 1, "mount": 1, "bpf": 1,
          "io_uring_setup": 1, "userfaultfd": 1, "perf_event_open": 1, "mknodat": 1}


def _parse(out: str) -> dict[str, tuple[int, int]]:
    rows = dict(line.split("=", 1) for line in out.split())
    return {k: (int(v.split("/")[0]), int(v.split("/")[1])) for k, v in rows.items()}


def test_the_filter_compiles_to_bpf() -> None:
    prog = compile_filter()
    assert prog and len(prog) % 8 == 0  # struct sock_filter is 8 bytes
    assert compile_filter(allow_fork=True) != prog


async def test_refused_syscalls_fail_inside() -> None:
    r = await run_python(PROBE)
    assert r.ok, r.stderr
    got = _parse(r.stdout)
    for name, err in DENIED.items():
        assert got[name] == (-1, err), (name, got[name])
    assert got["socket_unix"][0] >= 0


@pytest.mark.skipif(sys.platform != "linux", reason="x86_64 Linux syscall numbers")
def test_the_same_syscalls_work_outside() -> None:
    """Outside the sandbox several of them succeed: the refusals above are the filter's doing."""
    out = subprocess.run([sys.executable, "-c", PROBE.replace('call("mount"', '#'), ], capture_output=True,
                         text=True, timeout=30, cwd="/tmp").stdout
    got = _parse(out)
    assert got["ptrace"][0] == 0 and got["socket_inet"][0] >= 0 and got["keyctl"][0] >= 0


async def test_threads_work_where_processes_are_refused() -> None:
    code = ("import os, threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n"
            "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(out))\n"
            "try:\n    os.fork()\nexcept PermissionError:\n    print('no fork')\n")
    r = await run_python(code)
    assert r.ok, r.stderr
    assert r.stdout == f"{list(range(8))}\nno fork\n"


async def test_allow_fork_lets_a_child_run() -> None:
    code = ("import os\npid = os.fork()\nif pid == 0:\n    print('child', flush=True)\n    os._exit(0)\n"
            "os.waitpid(pid, 0)")
    r = await run_python(code, SandboxLimits(allow_fork=True))
    assert r.ok and r.stdout == "child\n", r


async def test_a_syscall_through_the_x32_abi_is_killed() -> None:
    """A denylist keyed on x86_64 numbers must not be bypassed with the x32 numbering."""
    code = ("import ctypes\nlibc = ctypes.CDLL(None)\nlibc.syscall.restype = ctypes.c_long\n"
            "print('before', flush=True)\n"
            "print('returned', libc.syscall(ctypes.c_long(0x40000000 | 250), 0, -3, 0), flush=True)\n")
    r = await run_python(code)
    assert r.stdout == "before\n"
    assert r.returncode == -signal.SIGSYS
