"""The Python sandbox (strategies/sandbox.py): output and exit codes, the wall-time, CPU and
memory limits, no network, no writes outside its directory, no child processes, clean-up, and
the fenced-code extraction that feeds it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strategies.sandbox import SandboxLimits, extract_code, run_python

pytestmark = pytest.mark.timeout(60)


class Spawned:
    """What ``run_python`` started: the process and its working directory."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.workdirs: list[str] = []

    @property
    def pid(self) -> int:
        assert len(self.procs) == 1, self.procs
        return self.procs[0].pid


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spawned]:
    """Records every process the sandbox starts (by wrapping asyncio's spawner)."""
    seen = Spawned()
    real = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real(*args, **kwargs)
        seen.procs.append(proc)
        seen.workdirs.append(str(kwargs.get("cwd")))
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    yield seen


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _gone(pid: int) -> bool:
    """No process with this pid, and none left in its process group (the sandbox's session)."""
    for probe in (os.kill, os.killpg):
        try:
            probe(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


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
    assert not _exists(spawned.workdirs[0])


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


async def test_output_is_capped() -> None:
    result, _ = await _run("print('x' * 100000 + 'END')", output_chars=500)
    assert result.ok
    assert len(result.stdout) == 500
    assert result.stdout.endswith("END\n")  # the tail is kept


async def test_runs_isolated_in_its_own_session_and_directory(spawned: Spawned) -> None:
    code = ("import os, sys\n"
            "print(os.getcwd())\n"
            "print(os.getsid(0) == os.getpid() == os.getpgid(0))\n"
            "print(sorted(k for k in os.environ if k != 'LC_CTYPE'))\n"
            "print(sys.flags.isolated)\n")
    result, _ = await _run(code)
    assert result.ok, result.stderr
    cwd, own_session, env, isolated = result.stdout.splitlines()
    assert _same_dir(cwd, spawned.workdirs[0])
    assert os.path.basename(cwd).startswith("sharpen-sandbox-")
    assert own_session == "True"
    assert env == "['HOME', 'PYTHONIOENCODING', 'TMPDIR']"  # nothing of the server's environment
    assert isolated == "1"


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
    assert not _exists(spawned.workdirs[0])


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
    # the port really is reachable from outside the sandbox
    with socket.create_connection(("127.0.0.1", port), timeout=2):
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
    assert "PermissionError" in result.stderr or "OSError" in result.stderr
    with pytest.raises(BlockingIOError):
        listening.accept()  # nothing got through


def _netns_permitted() -> bool:
    """Whether this kernel lets a process make a network namespace (as the sandbox tries)."""
    probe = ("import ctypes, sys\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "ok = libc.unshare(0x40000000) == 0 or libc.unshare(0x10000000 | 0x40000000) == 0\n"
             "sys.exit(0 if ok else 1)\n")
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


async def test_network_namespace_has_no_interfaces() -> None:
    if not _netns_permitted():
        pytest.skip("this kernel does not allow network namespaces here; the audit hook alone refuses sockets")
    code = ("import os\n"
            "print(os.readlink('/proc/self/ns/net'))\n"
            "print(open('/proc/self/net/dev').read())\n")
    result, _ = await _run(code)
    assert result.ok, result.stderr
    ns, _, dev = result.stdout.partition("\n")
    assert ns.startswith("net:[") and ns != os.readlink("/proc/self/ns/net")
    interfaces = [ln.split(":")[0].strip() for ln in dev.splitlines()[2:] if ":" in ln]
    assert interfaces in ([], ["lo"])
    # /sys/class/net is not checked: sysfs shows the namespace of whoever mounted it, not the reader's.


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
        "import os\nopen('inside.txt', 'w').write('x')\nos.replace('inside.txt', {path!r})",
        "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')",
    ],
    ids=["open-w", "open-a", "os.open", "pathlib", "shutil.copy", "os.rename", "os.replace", "symlink"],
)
async def test_writes_outside_the_sandbox_are_refused(template: str, tmp_path: Path) -> None:
    target = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    result, _ = await _run(template.format(path=str(target)))
    assert not result.ok
    assert "PermissionError" in result.stderr
    assert not target.exists()


async def test_relative_escape_and_existing_files_are_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    name = f"sharpen-escape-{uuid.uuid4().hex}.txt"
    code = (f"import os\n"
            f"for attempt in (lambda: open('../{name}', 'w'), lambda: os.remove({str(victim)!r}),\n"
            f"                lambda: open({str(victim)!r}, 'r+'), lambda: os.truncate({str(victim)!r}, 0)):\n"
            f"    try:\n"
            f"        attempt()\n"
            f"        print('ALLOWED')\n"
            f"    except PermissionError:\n"
            f"        print('refused')\n")
    result, _ = await _run(code)
    assert result.ok, result.stderr
    assert result.stdout.split() == ["refused"] * 4
    assert victim.read_text() == "keep me"
    assert not (Path(tempfile.gettempdir()) / name).exists()


async def test_writes_inside_the_sandbox_work(spawned: Spawned) -> None:
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
    assert not _exists(spawned.workdirs[0])  # the directory and all in it are gone


async def test_reading_is_allowed() -> None:
    result, _ = await _run("import json, math\nprint(math.factorial(10), json.dumps([1]))")
    assert result.ok and result.stdout == "3628800 [1]\n"


# ---- processes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "import subprocess\nsubprocess.run(['touch', {path!r}])",
        "import os\nos.system('touch ' + {path!r})",
        "import os\nos.execv('/usr/bin/touch', ['touch', {path!r}])",
        "import os\nos.posix_spawn('/usr/bin/touch', ['touch', {path!r}], {{}})",
        "import os\npid = os.fork()\nif pid == 0:\n    os.execv('/usr/bin/touch', ['touch', {path!r}])",
        "import os\nos.popen('touch ' + {path!r}).read()",
        "import pty\npty.spawn(['touch', {path!r}])",
        "import ctypes\nctypes.CDLL(None).system(('touch ' + {path!r}).encode())",
    ],
    ids=["subprocess", "os.system", "os.execv", "posix_spawn", "fork", "popen", "pty", "ctypes"],
)
async def test_child_processes_are_refused(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result, _ = await _run(template.format(path=str(marker)))
    assert not result.ok
    assert "PermissionError" in result.stderr, result.stderr
    await asyncio.sleep(0.1)
    assert not marker.exists()


# ---- clean-up and cancellation ------------------------------------------------------------------


async def test_temp_dir_is_removed_after_a_failure(spawned: Spawned) -> None:
    result, _ = await _run("open('left.txt', 'w').write('x')\nraise RuntimeError('x')")
    assert not result.ok
    assert not _exists(spawned.workdirs[0])


async def test_cancelling_the_caller_kills_the_child(spawned: Spawned) -> None:
    task = asyncio.create_task(run_python("import time\ntime.sleep(60)", SandboxLimits(wall_s=30)))
    for _ in range(500):
        if spawned.procs and _exists(f"/proc/{spawned.procs[0].pid}"):
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
    assert not _exists(spawned.workdirs[0])


# ---- extract_code -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```python\nprint(1)\n```", "print(1)"),
        ("```py\nprint(1)\n```", "print(1)"),
        ("```Python\nprint(1)\n```", "print(1)"),
        ("```\nprint(1)\n```", "print(1)"),
        # the last Python block wins
        ("```python\nprint(1)\n```\ntext\n```python\nprint(2)\n```\nThe answer is 2.", "print(2)"),
        # another language's block is skipped, and does not pair its closing fence with the next one
        ("```bash\npip install x\n```\nThen:\n```python\nprint(2)\n```", "print(2)"),
        ("```python\nprint(3)\n```\nOutput:\n```text\n3\n```", "print(3)"),
        # an untagged block after the code is usually its output: a tagged block is preferred
        ("```python\nprint(4)\n```\nOutput:\n```\n4\n```", "print(4)"),
        ("```python\nx = 1\n\n\nprint(x)\n```", "x = 1\n\n\nprint(x)"),
        ("no code here", None),
        ("", None),
        ("```js\nconsole.log(1)\n```", None),
    ],
)
def test_extract_code(text: str, expected: str | None) -> None:
    assert extract_code(text) == expected


def test_extract_code_none() -> None:
    assert extract_code(None) is None  # type: ignore[arg-type]
