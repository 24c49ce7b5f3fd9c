"""``server.backend.process_group.tied_to_parent``: a child that dies with its parent, SIGKILL
included (which no handler or atexit of the parent sees)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.backend import process_group
from server.backend.process_group import tied_to_parent
from tests.server.vllm_children import alive

ROOT = Path(__file__).resolve().parents[3]  # the parent imports server.* from the checkout

# A child that notes the signal it got (vLLM's API server shuts its engine down on SIGTERM).
CHILD = (
    "import signal, sys, time\n"
    "def note(signum, frame):\n"
    "    open(sys.argv[1], 'w').write(signal.Signals(signum).name)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, note)\n"
    "open(sys.argv[1], 'w').write('ready')\n"
    "time.sleep(60)\n"
)
# A parent that starts the tied child in its own session (as the vLLM child is), prints the
# child's pid, then waits to be killed.
PARENT = (
    "import subprocess, sys, time\n"
    "from server.backend.process_group import tied_to_parent\n"
    "child = subprocess.Popen(tied_to_parent([sys.executable, '-c', sys.argv[1], sys.argv[2]]),\n"
    "                         start_new_session=True)\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def _cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[:-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_tied_child_gets_sigterm_when_its_parent_is_killed(tmp_path: Path) -> None:
    got = tmp_path / "signal"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(got)], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        want = [b"-c", CHILD.encode(), str(got).encode()]
        deadline = time.monotonic() + 10
        while _cmdline(child)[1:] != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cmdline(child)[1:] == want  # the shim became the command (same pid)
        while not (got.exists() and got.read_text() == "ready") and time.monotonic() < deadline:
            time.sleep(0.05)  # its handler installed
        assert got.read_text() == "ready"
        parent.kill()  # SIGKILL: nothing in the parent runs
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the child outlived its SIGKILLed parent"
        assert got.read_text() == "SIGTERM"
    finally:
        parent.kill()
        parent.wait(timeout=10)


def test_the_child_runs_its_own_argv_and_exit_code() -> None:
    done = subprocess.run(tied_to_parent([sys.executable, "-c", "import sys; sys.exit(7)"]), timeout=30)
    assert done.returncode == 7


def test_elsewhere_the_argv_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_group.sys, "platform", "darwin")
    assert tied_to_parent(["vllm", "serve"]) == ["vllm", "serve"]
    monkeypatch.setattr(process_group.sys, "platform", "linux")
    argv = tied_to_parent(["vllm", "serve"], python="/py")
    assert argv[:2] == ["/py", "-c"] and argv[3:] == [str(os.getpid()), "vllm", "serve"]
