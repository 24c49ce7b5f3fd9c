"""Finding the embedded vLLM servers a sharpen process started, and whether they still live
(shared by the tests that start ``sharpen serve`` or ``sharpen eval`` with no upstream)."""

from __future__ import annotations

from pathlib import Path

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
READY_TIMEOUT = 240.0
STOP_TIMEOUT = 20.0


def _proc_state(pid: int) -> str | None:
    """The process's state letter (``R``, ``S``, ``Z``...), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")  # an unreaped zombie holds no memory or port


def vllm_processes(port: int | None = None, *, parent: int | None = None) -> dict[int, int]:
    """pid -> process group of every live vLLM API server started with ``--port port`` (any
    port when None) and, when given, whose parent process is ``parent``."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if VLLM_MODULE.encode() not in argv or b"--port" not in argv:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state, ppid, pgrp, ...
        if port is not None and argv[argv.index(b"--port") + 1] != str(port).encode():
            continue
        if fields[0] not in ("Z", "X") and (parent is None or int(fields[1]) == parent):
            found[int(entry.name)] = int(fields[2])
    return found
