"""The escape suite (issue 11): every attempt that got through the old in-process sandbox, made
again as tenant code through a real ``critique_refine`` request with tools, must fail, and the
server must keep serving. Each attempt prints ESCAPED only if it got what it wanted; the host
side checks what it can see directly (marker files, its own processes, memory, time)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from strategies.sandbox import SandboxLimits, policy, run_python
from strategies.sandbox.policy import MARKER
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(120)

APPROVE = "Looks right.\nFINAL VERIFICATION ANSWER: True"


def _host_env_markers() -> list[str]:
    """A few entries of this process's own environment, as /proc/<pid>/environ shows them."""
    with open("/proc/self/environ", "rb") as f:
        entries = [e.decode(errors="replace") for e in f.read().split(b"\0") if b"=" in e]
    return [e for e in entries if len(e) > 8][:3]


def _sandboxes_alive() -> list[int]:
    alive = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if MARKER.encode() in f.read():
                        alive.append(int(pid))
            except OSError:
                continue
    return alive


# Each attempt: code whose output contains ESCAPED only when it succeeded. {host} is the server's
# pid on the host, {data} its data directory, {port} its loopback port, {marker} a host path that
# must not appear, {env} entries of the server's environment.
TRY = """
def attempt(what, fn):
    try:
        got = fn()
    except BaseException as e:
        print('blocked', what, type(e).__name__, str(e)[:80])
        return
    print('ESCAPED' if got else 'blocked', what, repr(got)[:80])
"""
ATTACKS: dict[str, str] = {
    "read /etc/shadow": "attempt('shadow', lambda: open('/etc/shadow').read())",
    "read the server's environ": (
        "import os\n"
        "for pid in ({host}, os.getppid(), 1):\n"
        "    attempt(f'environ {{pid}}', lambda: any(m in open(f'/proc/{{pid}}/environ', 'rb').read().decode("
        "errors='replace') for m in {env!r}))"),
    "read the server's memory": (
        "import os\n"
        "def mem(pid):\n"
        "    maps = open(f'/proc/{{pid}}/maps').read().split()\n"
        "    start = int(maps[0].split('-')[0], 16)\n"
        "    with open(f'/proc/{{pid}}/mem', 'rb') as f:\n"
        "        f.seek(start)\n"
        "        return f.read(64)\n"
        "attempt('mem host', lambda: mem({host}))\n"
        # the parent the code sees is the sandbox's own init (bubblewrap), not the server
        "attempt('mem ppid', lambda: os.getppid() != 1 and mem(os.getppid()))"),
    "read the data dir and config": (
        "import os\n"
        "attempt('data dir', lambda: os.listdir({data!r}))\n"
        "attempt('etc', lambda: os.listdir('/etc'))\n"
        "attempt('home', lambda: os.listdir('/root') if os.path.exists('/root') and "
        "set(os.listdir('/root')) - {{'.pyenv'}} else None)"),
    "_posixsubprocess.fork_exec": (
        "import _posixsubprocess, os\n"
        "def run(exe, vfork):\n"
        "    r, w = os.pipe()\n"
        "    return _posixsubprocess.fork_exec([exe, '-c', 'open(\\'{marker}\\', \\'w\\')'], [exe.encode()], "
        "True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, vfork)\n"
        "for exe in ('/bin/sh', '{exe}'):\n"
        "    for vfork in (False, True):\n"
        "        attempt(f'fork_exec {{exe}} vfork={{vfork}}', lambda: run(exe, vfork))"),
    "_ctypes calls system()": (
        "import ctypes\n"
        "attempt('system', lambda: ctypes.CDLL(None).system(b'touch {marker}') == 0)"),
    "hook tampering": (
        "import builtins, os, os.path\n"
        "builtins.isinstance = lambda *a: False\n"
        "os.path.realpath = lambda p: '/tmp/' + str(p)\n"
        "attempt('tampered write', lambda: open({marker!r}, 'w').write('x'))\n"
        "attempt('tampered write root', lambda: open('/escape', 'w').write('x'))"),
    "dir_fd writes": (
        "import os\n"
        "def at(path, name):\n"
        "    d = os.open(path, os.O_RDONLY)\n"
        "    return os.open(name, os.O_WRONLY | os.O_CREAT, dir_fd=d)\n"
        "attempt('dir_fd /', lambda: at('/', 'escape'))\n"
        "attempt('dir_fd marker dir', lambda: at({marker_dir!r}, 'escape'))\n"
        "attempt('unlink dir_fd', lambda: os.unlink('python3.11', dir_fd=os.open('{exe_dir}', os.O_RDONLY)) or True)"),
    "sqlite3 outside tmp": (
        "import sqlite3\n"
        "attempt('sqlite data', lambda: sqlite3.connect({data!r} + '/memory.db').execute('select 1').fetchall())\n"
        "attempt('sqlite root', lambda: sqlite3.connect('/escape.db').execute('create table t(x)') and True)"),
    "mkfifo, mknod, chown, utime, setxattr": (
        "import os, stat\n"
        "attempt('mkfifo tmp', lambda: os.mkfifo('/tmp/fifo') or True)\n"
        "attempt('mkfifo root', lambda: os.mkfifo('/fifo') or True)\n"
        "attempt('mknod', lambda: os.mknod('/tmp/dev', stat.S_IFCHR | 0o600, os.makedev(1, 3)) or True)\n"
        "open('/tmp/f', 'w').write('x')\n"
        "attempt('chown', lambda: os.chown('/tmp/f', 0, 0) or True)\n"
        "attempt('utime outside', lambda: os.utime('{exe}', (0, 0)) or True)\n"
        "attempt('setxattr', lambda: os.setxattr('/tmp/f', 'user.x', b'1') or True)"),
    "nsenter the server's network": (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def enter(pid):\n"
        "    fd = os.open(f'/proc/{{pid}}/ns/net', os.O_RDONLY)\n"
        "    if libc.setns(fd, 0) != 0:\n"
        "        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))\n"
        "    return True\n"
        "attempt('setns host', lambda: enter({host}))\n"
        "attempt('setns ppid', lambda: enter(os.getppid()))\n"
        "attempt('nsenter binary', lambda: os.path.exists('/usr/bin/nsenter') or None)\n"
        "attempt('unshare', lambda: libc.unshare(0x10000000) == 0 or None)"),
    "sockets": (
        "import socket\n"
        "def tcp(family, addr):\n"
        "    s = socket.socket(family, socket.SOCK_STREAM)\n"
        "    s.settimeout(2)\n"
        "    s.connect(addr)\n"
        "    return True\n"
        "attempt('tcp4 loopback', lambda: tcp(socket.AF_INET, ('127.0.0.1', {port})))\n"
        "attempt('tcp6 loopback', lambda: tcp(socket.AF_INET6, ('::1', {port})))\n"
        "attempt('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) and True)\n"
        "attempt('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) and True)"),
    "signals to the parent and the host": (
        "import os, signal\n"
        "attempt('kill host', lambda: os.kill({host}, 0) or True)\n"
        "attempt('kill -1', lambda: os.kill(-1, 0) or None)\n"  # probes only: the real kill is below
        "attempt('ptrace', lambda: __import__('ctypes').CDLL(None).ptrace(16, 1, 0, 0) == 0 or None)\n"
        "print('ppid', os.getppid(), flush=True)\n"
        "os.kill(os.getppid(), signal.SIGKILL)"),
    "fork bomb": (
        "import os\n"
        "def bomb():\n"
        "    n = 0\n"
        "    while True:\n"
        "        os.fork()\n"
        "        n += 1\n"
        "attempt('fork bomb', bomb)\n"
        "import threading\n"
        "attempt('threads', lambda: [threading.Thread(target=lambda: None).start() for _ in range(4)] and None)"),
    "disk bomb in /tmp": (
        "import os\n"
        "def fill():\n"
        "    for i in range(1000):\n"
        "        with open(f'/tmp/bomb{{i}}', 'wb') as f:\n"
        "            f.write(b'x' * (4 << 20))\n"
        "    return True\n"
        "attempt('disk bomb', fill)\n"
        "print('tmp MiB', sum(os.path.getsize('/tmp/' + n) for n in os.listdir('/tmp')) >> 20)"),
}


@pytest.fixture
def served(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer]) -> Iterator[ProxyServer]:
    yield make_proxy(fake_upstream.url, memory={"enabled": False})


def _through_server(proxy: ProxyServer, fake: FakeUpstream, code: str, timeout_s: float = 20.0) -> str:
    """Runs ``code`` as the tool of a critique_refine request; returns what the critic was shown."""
    answer = f"Let me check.\n```python\n{code}\n```\n"
    fake.script(lambda body, i: APPROVE if "Critique the proposed answer" in str(body["messages"][-1]["content"])
                else answer)
    body = {"model": "fake", "messages": [{"role": "user", "content": "q"}], "max_tokens": 4096, "trace": True,
            "strategy": {"name": "critique_refine", "tools": True, "tool_timeout_s": timeout_s}}
    r = httpx.post(proxy.url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    tool: str = r.json()["sharpen"]["trace"]["rounds"][0]["tool"]
    return tool


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attempt_fails_and_the_server_keeps_serving(name: str, served: ProxyServer, fake_upstream: FakeUpstream,
                                                    tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    exe = os.path.realpath(sys.executable)
    code = TRY + ATTACKS[name].format(host=os.getpid(), data=str(served.settings.data_dir), port=served.port,
                                      marker=str(marker), marker_dir=str(tmp_path), env=_host_env_markers(),
                                      exe=exe, exe_dir=os.path.dirname(exe))
    tool = _through_server(served, fake_upstream, code)
    assert "ESCAPED" not in tool, tool
    assert "blocked" in tool or "ppid" in tool, tool  # the attempts really ran
    assert not marker.exists()
    assert not (Path("/") / "escape").exists() and not (Path("/") / "escape.db").exists()
    assert httpx.get(served.root + "/health", timeout=5).status_code == 200
    assert _sandboxes_alive() == []


def test_disk_bomb_is_capped(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    tool = _through_server(served, fake_upstream, TRY + ATTACKS["disk bomb in /tmp"].format())
    mib = int(tool.rsplit("tmp MiB", 1)[1].split()[0])
    assert mib <= SandboxLimits().tmp_mb


def _rss_peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))


def test_output_bomb_costs_the_server_little_memory(served: ProxyServer, fake_upstream: FakeUpstream) -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS
    base = _rss_peak_kib()
    t0 = time.monotonic()
    tool = _through_server(served, fake_upstream,
                           "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=15)
    elapsed = time.monotonic() - t0
    grown_mib = (_rss_peak_kib() - base) / 1024
    print(f"output bomb: server peak RSS +{grown_mib:.1f} MiB, stopped after {elapsed:.2f} s")
    assert "more than the output limit" in tool
    assert grown_mib < 32, grown_mib
    assert elapsed < 10
    assert httpx.get(served.root + "/health", timeout=5).status_code == 200


# ---- the whole process tree dies at the wall limit ----------------------------------------------

GRANDCHILD = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print('grandchild', os.getpid(), flush=True)
        while True:
            time.sleep(1)
    os._exit(0)
time.sleep(60)
"""


async def test_setsid_grandchildren_die_at_the_wall_limit() -> None:
    wall = 3.0  # the start-up is inside it: room for the grandchild to start on a busy machine
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        r = await run_python(GRANDCHILD, SandboxLimits(wall_s=wall, allow_fork=True))
        times.append(time.monotonic() - t0 - wall)
        assert r.timed_out and r.kill_s is not None and r.kill_s < 1.0
        assert "grandchild" in r.stdout, r
        assert _sandboxes_alive() == []
    times.sort()
    print(f"tree killed {1000 * times[len(times) // 2]:.0f} ms (median) after the wall limit, max "
          f"{1000 * times[-1]:.0f} ms")
    assert times[-1] < 1.0


async def test_a_fork_bomb_with_forks_allowed_is_bounded(tmp_path: Path) -> None:
    """With processes allowed (no request can ask for it), RLIMIT_NPROC bounds them where
    bubblewrap runs as an unprivileged uid; as root outside only the wall limit does."""
    code = ("import os\nn = 0\ntry:\n    while n < 200:\n        if os.fork() == 0:\n"
            "            import time; time.sleep(30); os._exit(0)\n        n += 1\n"
            "except OSError as e:\n    print('stopped at', n, e)\nprint('forked', n, flush=True)\n")
    r = await run_python(code, SandboxLimits(wall_s=3, allow_fork=True, max_processes=16))
    cmd = policy.build(SandboxLimits(allow_fork=True))
    cmd.close()
    if cmd.uid is not None or os.geteuid() != 0:
        assert "stopped at" in r.stdout, r
    assert _sandboxes_alive() == []

