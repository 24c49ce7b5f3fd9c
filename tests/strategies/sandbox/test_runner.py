"""Running code in the sandbox (strategies/sandbox/runner.py, policy.py): output and exit codes,
what the code sees, the wall-time, CPU, memory, file and output limits, no network, no writes
outside its /tmp, no child processes, clean-up, cancellation, and refusal when the isolation is
missing. The attacks from issue 11 are in test_escape.py."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strategies.sandbox import SandboxLimits, SandboxUnavailable, policy, run_python, runner
from strategies.sandbox.policy import MARKER

pytestmark = pytest.mark.timeout(60)


class Spawned:
    """The processes ``run_python`` started (bubblewrap; the first may be the one-time probe)."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    @property
    def pid(self) -> int:
        assert self.procs
        return self.procs[-1].pid


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spawned]:
    seen = Spawned()
    real = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real(*args, **kwargs)
        seen.procs.append(proc)
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    yield seen


def _gone(pid: int) -> bool:
    """No process with this pid, and none left in its process group."""
    for probe in (os.kill, os.killpg):
        try:
            probe(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


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


async def _run(code: str, **limits: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    result = await run_python(code, SandboxLimits(**limits))
    return result, time.monotonic() - t0


# ---- output and exit codes ----------------------------------------------------------------------


async def test_prints_and_exit_zero(spawned: Spawned) -> None:
    result, _ = await _run("print('hello', 6 * 7)\nimport sys\nprint('warn', file=sys.stderr)")
    assert result.stdout == "hello 42\n"
    assert result.stderr == "warn\n"
    assert result.returncode == 0 and not result.timed_out and result.ok
    assert result.summary() == "The code ran. Output:\nhello 42"
    assert _gone(spawned.pid)
    assert _sandboxes_alive() == []


async def test_nothing_printed() -> None:
    result, _ = await _run("x = 1")
    assert result.ok
    assert "(nothing printed)" in result.summary()


@pytest.mark.parametrize(("code", "rc"), [("import sys; sys.exit(3)", 3), ("raise SystemExit(0)", 0),
                                           ("import os; os._exit(7)", 7)])
async def test_exit_codes(code: str, rc: int) -> None:
    result, _ = await _run(code)
    assert result.returncode == rc
    assert result.ok is (rc == 0)


async def test_exception_is_a_failure_with_its_traceback() -> None:
    result, _ = await _run("print('before')\nraise ValueError('boom-123')")
    assert result.returncode == 1 and not result.ok
    assert result.stdout == "before\n"
    assert "ValueError: boom-123" in result.stderr
    s = result.summary()
    assert s.startswith("The code failed (exit 1).") and "before" in s and "ValueError: boom-123" in s


async def test_syntax_error_is_a_failure() -> None:
    result, _ = await _run("def (:")
    assert result.returncode == 1
    assert "SyntaxError" in result.stderr


async def test_output_is_capped_and_marked() -> None:
    result, _ = await _run("print('x' * 100000 + 'END')", output_chars=500)
    assert result.ok
    head, _, tail = result.stdout.partition("\n")
    assert head == f"[... {100004 - 500} bytes cut ...]"
    assert len(tail) == 500 and tail.endswith("END\n")  # the tail is kept


async def test_output_past_the_limit_stops_the_run(spawned: Spawned) -> None:
    result, elapsed = await _run("import sys\nwhile True:\n    sys.stdout.write('y' * 4096)", wall_s=20,
                                 output_max_bytes=256 * 1024)
    assert result.output_exceeded and not result.ok and not result.timed_out
    assert result.summary().startswith("The code printed more than the output limit and was stopped.")
    assert elapsed < 10
    assert _gone(spawned.pid)


async def test_what_the_code_sees() -> None:
    code = ("import os, sys, socket\n"
            "print(os.getcwd())\n"
            "try:\n    os.open('/dev/tty', os.O_RDWR)\n    print('a terminal')\nexcept OSError as e:\n"
            "    print(e.errno == 6)\n"
            "print(sorted(os.environ))\n"
            "print(sys.flags.isolated, os.getuid(), os.getgid(), socket.gethostname())\n"
            "print(sorted(os.listdir('/')))\n"
            "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
            "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
            "print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n")
    result, _ = await _run(code)
    assert result.ok, result.stderr
    cwd, no_tty, env, ids, root, pids, caps, seccomp = result.stdout.splitlines()
    assert cwd == "/tmp"
    assert no_tty == "True"  # a new session without a controlling terminal: nothing to inject into
    assert env == "['HOME', 'LC_CTYPE', 'PWD', 'PYTHONIOENCODING', 'TMPDIR']"  # nothing of the server's environment
    assert ids == f"1 {policy.INNER_UID} {policy.INNER_GID} {MARKER}"
    top = {p.split(os.sep)[1] for p in (*policy.runtime_files()[2], policy.runtime_files()[0])}
    assert set(eval(root)) == {"dev", "proc", "tmp"} | top  # no etc, home, data, usr/bin
    assert eval(pids) == ["1", "2"]  # bubblewrap's init and the code: no host process
    assert int(caps, 16) == 0
    assert seccomp == "2"  # a filter is loaded


async def test_the_filesystem_is_read_only_and_tmp_is_fresh() -> None:
    first, _ = await _run("open('/tmp/left.txt', 'w').write('x')\nprint(open('/tmp/left.txt').read())")
    assert first.ok and first.stdout == "x\n"
    second, _ = await _run("import os\nprint(os.listdir('/tmp'))\nopen('/new', 'w')")
    assert second.stdout == "[]\n"
    assert "Read-only file system" in second.stderr


# ---- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(60)"],
                         ids=["busy-loop", "sleep"])
async def test_wall_time_limit_kills_the_child(code: str, spawned: Spawned) -> None:
    result, elapsed = await _run(code, wall_s=1.0, cpu_s=30)
    assert result.timed_out
    assert result.returncode is None and not result.ok
    assert result.summary() == "The code did not finish within the time limit and was killed."
    assert 0.9 <= elapsed < 2.0, elapsed
    assert _gone(spawned.pid)
    assert _sandboxes_alive() == []


async def test_cpu_limit_kills_a_busy_loop(spawned: Spawned) -> None:
    # a generous wall limit: on a loaded machine one CPU-second can take several wall seconds
    result, _ = await _run("while True: pass", wall_s=30.0, cpu_s=1)
    assert not result.timed_out  # the CPU limit, not the wall clock, ended it
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert not result.ok
    assert _gone(spawned.pid)


async def test_memory_limit() -> None:
    code = "x = bytearray(1024 * 1024 * 1024)\nprint('allocated', len(x))"
    result, _ = await _run(code, memory_mb=256)
    assert not result.ok
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr or (result.returncode or 0) < 0
    # well under the limit is fine
    small, _ = await _run("x = bytearray(16 * 1024 * 1024)\nprint(len(x))", memory_mb=256)
    assert small.ok and small.stdout.strip() == str(16 * 1024 * 1024)


async def test_file_size_limit() -> None:
    code = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (3 * 1024 * 1024))\nprint('wrote')"
    result, _ = await _run(code, file_mb=1)
    assert not result.ok
    assert "wrote" not in result.stdout


async def test_tmp_size_limit() -> None:
    code = ("for i in range(10):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    print(i, flush=True)")
    result, _ = await _run(code, tmp_mb=4, file_mb=8)
    assert not result.ok
    assert "No space left on device" in result.stderr
    assert result.stdout.split()[-1] in ("2", "3")


async def test_open_files_limit() -> None:
    result, _ = await _run("fs = [open('/dev/null') for _ in range(100)]", max_open_files=32)
    assert "Too many open files" in result.stderr


# ---- network ------------------------------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A loopback port that IS listening, so only the sandbox can make a connection fail."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield srv
    srv.close()


@pytest.mark.parametrize("module", ["socket", "_socket"])
async def test_network_is_refused(module: str, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=2):  # reachable from outside the sandbox
        pass
    listening.accept()[0].close()
    code = (f"import {module} as s\n"
            f"c = s.socket(s.AF_INET, s.SOCK_STREAM)\n"
            f"c.settimeout(2)\n"
            f"c.connect(('127.0.0.1', {port}))\n"
            f"print('connected')\n")
    result, _ = await _run(code)
    assert not result.ok
    assert "connected" not in result.stdout
    assert "PermissionError" in result.stderr
    with pytest.raises(BlockingIOError):
        listening.accept()  # nothing got through


async def test_network_namespace_has_no_interfaces() -> None:
    code = ("import os\n"
            "print(os.readlink('/proc/self/ns/net'))\n"
            "print(open('/proc/self/net/dev').read())\n")
    result, _ = await _run(code)
    assert result.ok, result.stderr
    ns, _, dev = result.stdout.partition("\n")
    assert ns.startswith("net:[") and ns != os.readlink("/proc/self/ns/net")
    interfaces = [ln.split(":")[0].strip() for ln in dev.splitlines()[2:] if ":" in ln]
    assert interfaces in ([], ["lo"])


# ---- files --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "open({path!r}, 'w').write('x')",
        "open({path!r}, 'a').write('x')",
        "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        "import pathlib\npathlib.Path({path!r}).write_text('x')",
        "import shutil\nopen('inside.txt', 'w').write('x')\nshutil.copy('inside.txt', {path!r})",
        "import os\nopen('inside.txt', 'w').write('x')\nos.rename('inside.txt', {path!r})",
        "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')",
    ],
    ids=["open-w", "open-a", "os.open", "pathlib", "shutil.copy", "os.rename", "symlink"],
)
async def test_writes_outside_the_sandbox_fail(template: str, tmp_path: Path) -> None:
    target = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    result, _ = await _run(template.format(path=str(target)))
    assert not result.ok
    assert "FileNotFoundError" in result.stderr  # the host's directories do not exist in there
    assert not target.exists()


async def test_existing_host_files_are_out_of_reach(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    code = (f"import os\n"
            f"for attempt in (lambda: open('../escape', 'w'), lambda: os.remove({str(victim)!r}),\n"
            f"                lambda: open({str(victim)!r}, 'r+'), lambda: os.truncate({str(victim)!r}, 0)):\n"
            f"    try:\n"
            f"        attempt()\n"
            f"        print('ALLOWED')\n"
            f"    except OSError as e:\n"
            f"        print(type(e).__name__)\n")
    result, _ = await _run(code)
    assert result.ok, result.stderr
    assert result.stdout.split() == ["OSError"] + ["FileNotFoundError"] * 3
    assert victim.read_text() == "keep me"


async def test_writes_inside_the_sandbox_work() -> None:
    code = ("import os, pathlib\n"
            "open('a.txt', 'w').write('hi')\n"
            "os.makedirs('sub/dir')\n"
            "pathlib.Path('sub/dir/b.txt').write_text('there')\n"
            "os.rename('a.txt', 'sub/a.txt')\n"
            "print(open('sub/a.txt').read(), pathlib.Path('sub/dir/b.txt').read_text())\n"
            "os.remove('sub/a.txt')\n"
            "print(sorted(os.listdir('.')))\n")
    result, _ = await _run(code)
    assert result.ok, result.stderr
    assert result.stdout == "hi there\n['sub']\n"


async def test_reading_the_standard_library_works() -> None:
    code = ("import json, math, sqlite3, ctypes, decimal, hashlib, threading\n"
            "print(math.factorial(10), json.dumps([1]), sqlite3.connect(':memory:').execute('select 2').fetchone())")
    result, _ = await _run(code)
    assert result.ok, result.stderr
    assert result.stdout == "3628800 [1] (2,)\n"


# ---- processes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "import subprocess\nsubprocess.run(['touch', {path!r}])",
        "import os\nassert os.system('touch ' + {path!r}) == 0",
        "import os\nos.posix_spawn('/usr/bin/touch', ['touch', {path!r}], {{}})",
        "import os\npid = os.fork()\nif pid == 0:\n    os.execv('/usr/bin/touch', ['touch', {path!r}])",
        "import os\nos.popen('touch ' + {path!r}).read()",
        "import pty\npty.spawn(['touch', {path!r}])",
        "import ctypes\nassert ctypes.CDLL(None).system(('touch ' + {path!r}).encode()) == 0",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    ],
    ids=["subprocess", "os.system", "posix_spawn", "fork", "popen", "pty", "ctypes", "multiprocessing"],
)
async def test_child_processes_are_refused(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result, _ = await _run(template.format(path=str(marker)))
    assert not result.ok
    assert "PermissionError" in result.stderr or "AssertionError" in result.stderr, result.stderr
    assert not marker.exists()


async def test_exec_finds_nothing_to_run(tmp_path: Path) -> None:
    result, _ = await _run(f"import os\nos.execv('/usr/bin/touch', ['touch', {str(tmp_path / 'x')!r}])")
    assert "FileNotFoundError" in result.stderr
    assert not (tmp_path / "x").exists()


# ---- clean-up, cancellation, refusal ------------------------------------------------------------


async def test_cancelling_the_caller_kills_the_tree(spawned: Spawned) -> None:
    await run_python("pass")  # the one-time probe is behind us
    task = asyncio.create_task(run_python("import time\nprint('up', flush=True)\ntime.sleep(60)",
                                          SandboxLimits(wall_s=30)))
    for _ in range(500):
        if len(spawned.procs) == 2 and len(_sandboxes_alive()) >= 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # past the exec: really running the user's code
    pid = spawned.pid
    assert not _gone(pid)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 2.0
    assert _gone(pid)
    assert _sandboxes_alive() == []


async def test_missing_bubblewrap_refuses_to_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runner, "_PROBE_OK", False)
    monkeypatch.setattr(policy.shutil, "which", lambda name: None)
    monkeypatch.setattr(policy.os.path, "exists", lambda p: False)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        await run_python(f"open({str(tmp_path / 'ran')!r}, 'w')")
    assert not (tmp_path / "ran").exists()


@pytest.fixture
def failing_bwrap(tmp_path: Path) -> Path:
    """A bwrap that fails as the real one does where user namespaces are off."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    return fake


async def test_bubblewrap_without_namespaces_refuses_to_run(monkeypatch: pytest.MonkeyPatch,
                                                            failing_bwrap: Path) -> None:
    fake = failing_bwrap
    monkeypatch.setattr(runner, "_PROBE_OK", False)
    monkeypatch.setattr(policy, "bwrap_path", lambda: str(fake))
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        await run_python("print(1)")
