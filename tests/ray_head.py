"""A local Ray head on loopback for tests, started with ``ray start --head --block`` and stopped
by signalling that one process (never ``ray stop``, which would stop every Ray on the machine).

Every port Ray would otherwise take at a fixed default (GCS, dashboard, client server, dashboard
agent) is a free loopback port; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from replacing
127.0.0.1 with the machine's routable address, so nothing listens beyond loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from tests.proxy_server import free_port


class RayHead:
    """``with RayHead() as head:`` -> ``head.address`` is the job API (``http://127.0.0.1:PORT``)."""

    def __init__(self, *, num_cpus: int = 1, start_timeout: float = 120.0) -> None:
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # short: Ray's unix sockets live under it, and socket paths are limited to 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.log_path = self.temp_dir / "ray-start.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        ray = str(Path(sys.executable).parent / "ray")
        return [ray, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                "--num-cpus", str(self.num_cpus), "--temp-dir", str(self.temp_dir),
                "--ray-client-server-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port())]

    def __enter__(self) -> Self:
        env = dict(os.environ)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # see the module docstring
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.address + "/api/jobs/", timeout=2, trust_env=False).status_code == 200:
                    return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the Ray head did not start; its log:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """SIGTERM to ``ray start --block`` makes it stop what it started (~3 s); SIGKILL to its
        process group if it does not."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
