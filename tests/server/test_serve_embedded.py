"""The default deployment end to end: ``sharpen serve --model ...`` with no upstream starts its own
vLLM child, serves through it, restarts it when it dies, and takes it down on SIGTERM (and, by
the kernel's parent-death signal, on SIGKILL).

Heavy: a second vLLM (~3.5 GB, ~30 s to start) besides the session's; run it alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from server.backend.process_group import group_members
from tests.proxy_server import free_port
from tests.real_backend import REAL_MODEL
from tests.server.vllm_children import READY_TIMEOUT, STOP_TIMEOUT, alive, vllm_processes

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]



class Serve:
    """A ``sharpen serve`` subprocess and what it writes."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.out_path = data_dir / "sharpen.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARPEN_")}
        env.update(SHARPEN_BACKEND__KV_CACHE_GIB="1", SHARPEN_DATA_DIR=str(data_dir))
        sharpen = Path(sys.executable).with_name("sharpen")
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(sharpen), "serve", "--model", REAL_MODEL, "--port", str(port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            )

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        vllm_log = self.data_dir / "logs" / "vllm.log"
        tail = vllm_log.read_text(errors="replace")[-4000:] if vllm_log.exists() else "(no vllm.log)"
        return f"--- sharpen output:\n{self.out_path.read_text(errors='replace')[-4000:]}\n--- vllm.log:\n{tail}"

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.root + path, timeout=timeout, trust_env=False)

    def wait_status(self, path: str, status: int, timeout: float) -> float:
        """Seconds until ``GET path`` answers ``status``; fails the test on timeout or exit."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"sharpen exited with {self.proc.returncode}\n{self.output()}"
            with contextlib.suppress(httpx.HTTPError):
                if self.get(path).status_code == status:
                    return time.monotonic() - t0
            time.sleep(0.5)
        pytest.fail(f"GET {path} did not answer {status} within {timeout:.0f} s\n{self.output()}")

    def vllm_port(self) -> int:
        upstream = self.get("/ready").json()["upstream"]
        port = urlsplit(upstream).port
        assert port is not None
        return port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _chat(serve: Serve) -> str:
    with openai.OpenAI(base_url=serve.root + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
        r = client.chat.completions.create(
            model=REAL_MODEL, messages=[{"role": "user", "content": "Say hello in one sentence."}],
            max_tokens=16, temperature=0,
        )
    assert r.model == REAL_MODEL
    return r.choices[0].message.content or ""


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    s = Serve(tmp_path_factory.mktemp("sharpen-data"), free_port())
    try:
        up = s.wait_status("/health", 200, 60)
        took = s.wait_status("/ready", 200, READY_TIMEOUT)
        print(f"sharpen serve: /health after {up:.1f} s, /ready {took:.1f} s later")
        yield s
    finally:
        port = None
        with contextlib.suppress(Exception):
            port = s.vllm_port()
        s.stop()
        if port is not None:
            _kill_leftovers(port)


def _kill_leftovers(port: int) -> None:
    """Should a failed test leave a vLLM on ``port``, do not leak its 3.5 GB."""
    for pid, pgid in vllm_processes(port).items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)


def test_a_sigkilled_sharpen_takes_vllm_down(tmp_path: Path) -> None:
    # First in the module, on its own server: the module's `serve` starts after this one is gone.
    s = Serve(tmp_path, free_port())
    port = None
    try:
        s.wait_status("/health", 200, 60)
        s.wait_status("/ready", 200, READY_TIMEOUT)
        port = s.vllm_port()
        ((_, pgid),) = vllm_processes(port).items()
        members = group_members(pgid)
        assert len(members) >= 2  # the API server and its engine core at least
        t0 = time.monotonic()
        s.proc.kill()  # no handler, finally or atexit of sharpen's runs
        s.proc.wait(timeout=10)
        while time.monotonic() - t0 < STOP_TIMEOUT and (vllm_processes(port) or any(alive(p) for p in members)):
            time.sleep(0.2)
        took = time.monotonic() - t0
        assert not vllm_processes(port), f"vLLM still runs {took:.1f} s after sharpen's SIGKILL\n{s.output()}"
        assert not [p for p in members if alive(p)], f"vLLM's children outlived sharpen\n{s.output()}"
        print(f"sharpen serve SIGKILLed: vLLM gone {took:.1f} s later")
    finally:
        s.stop()
        if port is not None:
            _kill_leftovers(port)


def test_serves_through_embedded_vllm(serve: Serve) -> None:
    assert _chat(serve).strip()
    ids = [m["id"] for m in serve.get("/v1/models", timeout=30).json()["data"]]
    assert REAL_MODEL in ids
    assert (serve.data_dir / "logs" / "vllm.log").is_file()
    assert "Application startup complete" in (serve.data_dir / "logs" / "vllm.log").read_text(errors="replace")
    assert len(vllm_processes(serve.vllm_port())) == 1


def test_restarts_a_killed_vllm(serve: Serve) -> None:
    port = serve.vllm_port()
    (pid, pgid), = vllm_processes(port).items()
    os.kill(pid, signal.SIGKILL)
    serve.wait_status("/ready", 503, 15)
    took = serve.wait_status("/ready", 200, READY_TIMEOUT)  # ~30 s on a quiet machine
    print(f"sharpen serve: vLLM back {took:.1f} s after the kill")
    assert serve.proc.poll() is None
    assert serve.vllm_port() == port
    (new_pid, _), = vllm_processes(port).items()
    assert new_pid != pid
    assert not group_members(pgid), "the killed server's engine and workers were left behind"
    assert _chat(serve).strip()


def test_sigterm_takes_vllm_down(serve: Serve) -> None:
    serve.wait_status("/ready", 200, READY_TIMEOUT)
    port = serve.vllm_port()
    servers = vllm_processes(port)
    assert len(servers) == 1
    (pgid,) = servers.values()
    members = group_members(pgid)
    assert len(members) >= 2  # the API server and its engine core at least
    t0 = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    code = serve.proc.wait(timeout=STOP_TIMEOUT)
    while time.monotonic() - t0 < STOP_TIMEOUT and (vllm_processes(port) or any(alive(p) for p in members)):
        time.sleep(0.2)
    took = time.monotonic() - t0
    assert not vllm_processes(port), f"vLLM still runs {took:.1f} s after SIGTERM\n{serve.output()}"
    assert not [p for p in members if alive(p)], f"vLLM's children outlived sharpen\n{serve.output()}"
    # uvicorn re-raises the signal it caught once its graceful shutdown is done
    assert code in (0, -signal.SIGTERM), serve.output()
    out = serve.out_path.read_text(errors="replace")
    assert "Application shutdown complete" in out and "stopping vLLM" in out, serve.output()
    print(f"sharpen serve: it and vLLM gone {took:.1f} s after SIGTERM")
