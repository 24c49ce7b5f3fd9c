"""The sandbox's inputs and outputs: per-run limits, the result, and the refusal error."""

from __future__ import annotations

import signal
from dataclasses import dataclass


class SandboxUnavailable(RuntimeError):
    """The isolation the sandbox needs (bubblewrap, namespaces, seccomp) is not available here.
    Code is then never run: callers abstain from the tool and say so."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``wall_s`` bounds the whole run (the process tree is killed at it); ``cpu_s``
    the CPU it may burn; ``memory_mb`` each process's address space; ``tmp_mb`` the size of its
    /tmp; ``output_chars`` how much of each stream is kept (the tail); ``output_max_bytes`` how
    much it may print before it is stopped. ``allow_fork`` lets it start processes (off: threads
    only), bounded by ``max_processes``."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    output_chars: int = 4000
    output_max_bytes: int = 1024 * 1024
    file_mb: int = 8
    tmp_mb: int = 16
    max_processes: int = 16
    max_open_files: int = 64
    allow_fork: bool = False


@dataclass
class SandboxResult:
    """What the code printed (tails, marked when cut), and how it ended; ``kill_s``: on a timeout,
    the seconds from the kill to the last process of the tree gone."""

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool = False
    output_exceeded: bool = False
    kill_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded

    def summary(self, limit: int = 1500) -> str:
        if self.timed_out:
            return "The code did not finish within the time limit and was killed."
        if self.returncode == -signal.SIGXCPU:
            return "The code did not finish within the time limit and was killed (CPU time)."
        out = self.stdout.strip()[-limit:]
        err = self.stderr.strip()[-limit:]
        if self.output_exceeded:
            return f"The code printed more than the output limit and was stopped. Last output:\n{out}"
        if self.returncode == 0:
            return f"The code ran. Output:\n{out or '(nothing printed)'}"
        return f"The code failed (exit {self.returncode}). Output:\n{out}\nError:\n{err}"
