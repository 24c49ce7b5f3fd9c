"""Runs model-written Python (CRITIC's tool feedback, code checkers) in a bubblewrap sandbox.

Threat model. The code is hostile: written by a model that any tenant can steer with a prompt.
It must not read anything of the host (the server's environment or memory through /proc, its
config and data directory, other tenants' rows, /etc/shadow, keys), write anything outside its
own throw-away /tmp, reach any network (the server's loopback admin routes included), signal or
trace host processes, gain privileges, or deny service to the server (CPU, memory, processes,
disk, output, or outliving its time limit). Out of scope: kernel vulnerabilities beyond what the
seccomp filter narrows, and side channels (timing, cache).

Layers (each checked by tests/strategies/sandbox/test_escape.py):
- bubblewrap, a well-kept setuid-free isolation tool (Flatpak's), with new user, PID, mount,
  IPC, UTS, network and cgroup namespaces, no capabilities, no nested user namespaces; started
  as an unprivileged uid (65534) when the server is root, an unprivileged uid (1000) inside;
- a read-only filesystem holding only the Python runtime, a fresh /proc, a minimal /dev, a
  size-capped tmpfs /tmp (``policy``);
- a seccomp filter built with libseccomp (``seccomp``); process creation refused by default;
- rlimits inside: CPU, address space, processes, file size, open files, no core dumps;
- a wall-clock limit that kills the whole tree; output read with a byte cap (``runner``).
If bubblewrap is missing or cannot create namespaces, ``run_python`` raises SandboxUnavailable
and nothing runs: there is no weaker fallback.
"""

from strategies.sandbox.extract import extract_code
from strategies.sandbox.result import SandboxLimits, SandboxResult, SandboxUnavailable
from strategies.sandbox.runner import run_python

__all__ = ["SandboxLimits", "SandboxResult", "SandboxUnavailable", "extract_code", "run_python"]
