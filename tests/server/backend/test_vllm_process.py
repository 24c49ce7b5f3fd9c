"""The supervised vLLM child: fast tests with a stand-in server, one with real vLLM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from server.backend.cpu import CpuInfo
from server.backend.process_group import group_members
from server.backend.vllm_process import BackendError, VLLMProcess
from server.backend.weights import PreparedModel
from server.settings import BackendSettings
from tests.server.backend.cpus import SAPPHIRE_RAPIDS, ZEN3, cpu

# A stand-in for vLLM: answers /health with 200 after an optional delay. Modes: serve, exit
# (prints an error and exits 3), hang (never listens), child (also spawns a sleeping grandchild),
# stubborn (ignores SIGTERM). Each start appends its pid to STATE/starts.
STAND_IN = r"""
import http.server, os, pathlib, signal, subprocess, sys, time
port, mode, delay, state = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), pathlib.Path(sys.argv[4])
with (state / "starts").open("a") as f:
    f.write(f"{os.getpid()}\n")
print(f"stand-in {mode} starting", flush=True)
if mode == "exit":
    print("ValueError: fatal: no such model", flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(600)
if mode == "child":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (state / "grandchild").write_text(str(child.pid))
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(delay)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


class StandIn(VLLMProcess):
    """Runs the stand-in script instead of vLLM."""

    def __init__(
        self, tmp_path: Path, mode: str = "serve", delay: float = 0.0, cpu: CpuInfo | None = None, **settings: object
    ) -> None:
        defaults: dict[str, object] = {"restart_backoff": 0.05, "max_restarts": 3, "start_timeout": 30.0}
        super().__init__(
            BackendSettings.model_validate(defaults | settings),
            PreparedModel(tmp_path / "model", "stand-in"),
            tmp_path / "logs" / "vllm.log",
            cpu=cpu,
        )
        self.script = tmp_path / "stand_in.py"
        self.script.write_text(STAND_IN)
        self.mode, self.delay, self.state = mode, delay, tmp_path

    def command(self) -> list[str]:
        return [self.python, str(self.script), str(self.port), self.mode, str(self.delay), str(self.state)]

    def starts(self) -> list[int]:
        path = self.state / "starts"
        return [int(x) for x in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


async def eventually(condition: object, timeout: float = 15.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# ---- command and environment ------------------------------------------------------------------


def test_command_environment_and_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    settings = BackendSettings(kv_cache_gib=0.4, max_model_len=1024, extra_args=["--seed", "1"])
    model = PreparedModel(tmp_path / "m", "small")
    process = VLLMProcess(settings, model, tmp_path / "log", python="/py", cpu=cpu(SAPPHIRE_RAPIDS))
    assert 0 < process.port < 65536
    assert process.base_url == f"http://127.0.0.1:{process.port}/v1"
    assert process.served_name == "small" and not process.ready and process.pid is None
    assert process.command() == [
        "/py", "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / "m"),
        "--served-model-name", "small", "--host", "127.0.0.1", "--port", str(process.port),
        "--max-model-len", "1024", "--dtype", "bfloat16", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
        "--no-enable-chunked-prefill", "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--seed", "1",
    ]  # fmt: skip
    no_tools = VLLMProcess(BackendSettings(tool_call_parser=None), model, tmp_path / "log", python="/py")
    assert "--enable-auto-tool-choice" not in no_tools.command() and "--tool-call-parser" not in no_tools.command()
    env = process.environ()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"

    named = BackendSettings(port=8123, served_model_name="alias", kv_cache_gib=3, omp_threads_bind="0", lora="off")
    hub_model = PreparedModel(Path("org/model"), "org/model", hub_id="org/model")
    hub = VLLMProcess(named, hub_model, tmp_path / "l", cpu=cpu(ZEN3))
    assert hub.port == 8123 and hub.served_name == "alias"
    assert hub.command()[3:6] == ["--model", "org/model", "--served-model-name"]
    # no LoRA slots, float32 on an AVX2-only CPU; the tool-call parser whatever the CPU
    assert hub.command()[-6:] == ["--dtype", "float32", "--no-enable-chunked-prefill", "--enable-auto-tool-choice",
                                  "--tool-call-parser", "hermes"]
    assert "--enable-lora" not in hub.command()
    env = hub.environ()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    assert "HF_HUB_OFFLINE" not in env and "TRANSFORMERS_OFFLINE" not in env


async def test_start_logs_the_choices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.backend.vllm_process")
    process = StandIn(tmp_path, cpu=cpu(ZEN3))
    await process.start()
    await process.stop()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vLLM backend: ")]
    assert logged == [f"vLLM backend: {reason}" for reason in process.plan.reasons]
    assert any("dtype float32 (auto)" in line for line in logged)


async def test_start_failure_is_a_backend_error(tmp_path: Path) -> None:
    process = VLLMProcess(BackendSettings(), PreparedModel(tmp_path, "m"), tmp_path / "log", python="/nonexistent")
    with pytest.raises(BackendError, match="cannot start vLLM"):
        await process.start()
    await process.stop()


# ---- with a stand-in child --------------------------------------------------------------------


async def test_wait_ready_succeeds_on_200(tmp_path: Path) -> None:
    async with StandIn(tmp_path, delay=1.0) as process:
        assert process.ready and process.pid is not None
        async with httpx.AsyncClient(trust_env=False) as client:
            assert (await client.get(f"{process.origin}/health")).status_code == 200
        pid = process.pid
    assert not process.ready and process.pid is None and not alive(pid)
    assert "stand-in serve starting" in (tmp_path / "logs" / "vllm.log").read_text()


async def test_ready_is_tracked_without_wait_ready(tmp_path: Path) -> None:
    process = StandIn(tmp_path)
    await process.start()
    try:
        await eventually(lambda: process.ready)
    finally:
        await process.stop()


async def test_wait_ready_raises_with_the_log_tail_when_the_child_exits(tmp_path: Path) -> None:
    process = StandIn(tmp_path, mode="exit")
    await process.start()
    try:
        with pytest.raises(BackendError, match="exited with code 3") as info:
            await process.wait_ready(30)
        assert "fatal: no such model" in str(info.value)
        await asyncio.sleep(0.3)
        assert process.gave_up and process.starts() and len(process.starts()) == 1  # no restart
    finally:
        await process.stop()


async def test_wait_ready_times_out(tmp_path: Path) -> None:
    process = StandIn(tmp_path, mode="hang")
    await process.start()
    try:
        with pytest.raises(BackendError, match="not ready after 1s"):
            await process.wait_ready(1.0)
        assert "stand-in hang starting" in (tmp_path / "logs" / "vllm.log").read_text()
    finally:
        await process.stop()


async def test_supervisor_restarts_a_child_that_dies(tmp_path: Path) -> None:
    async with StandIn(tmp_path) as process:
        first = process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: not process.ready)
        await process.wait_ready(15)  # waits through the restart
        assert process.ready and process.restarts == 1
        assert process.pid not in (None, first) and process.starts() == [first, process.pid]


async def test_supervisor_gives_up_after_max_restarts(tmp_path: Path) -> None:
    async with StandIn(tmp_path, max_restarts=1) as process:
        first = process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: process.pid not in (None, first))
        await process.wait_ready(15)
        second = process.pid
        assert second is not None and process.restarts == 1
        os.kill(second, signal.SIGKILL)
        await eventually(lambda: process.gave_up)
        assert not process.ready and process.restarts == 1
        with pytest.raises(BackendError, match="exited"):
            await process.wait_ready(5)
        assert process.starts() == [first, second]


async def test_a_child_that_served_long_enough_starts_a_new_count(tmp_path: Path) -> None:
    """The limit counts restarts in a row: a crash after ``restart_reset_s`` of service is
    restarted even when earlier crashes used up ``max_restarts`` (weeks apart, not a loop)."""
    async with StandIn(tmp_path, max_restarts=1, restart_reset_s=1.5) as process:
        for k in range(3):
            pid = process.pid
            assert pid is not None
            await asyncio.sleep(1.6)  # served longer than restart_reset_s
            os.kill(pid, signal.SIGKILL)
            await eventually(lambda old=pid: process.pid not in (None, old))
            await process.wait_ready(15)
            assert process.ready and process.restarts == k + 1 and not process.gave_up
        # and a crash straight after a restart is the second in a row: over the limit of 1
        pid = process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: process.gave_up)
        assert process.restarts == 3 and len(process.starts()) == 4


async def test_stop_kills_the_process_group(tmp_path: Path) -> None:
    process = StandIn(tmp_path, mode="child")
    async with process:
        leader = process.pid
        assert leader is not None
        grandchild = int((tmp_path / "grandchild").read_text())
        assert alive(grandchild) and set(group_members(leader)) == {leader, grandchild}
    assert not alive(leader) and not alive(grandchild) and group_members(leader) == []
    await process.stop()  # idempotent
    await asyncio.sleep(0.3)
    assert process.starts() == [leader], "a stopped child is not restarted"


async def test_stop_falls_back_to_sigkill(tmp_path: Path) -> None:
    process = StandIn(tmp_path, mode="stubborn")
    process.stop_grace = 0.5
    async with process:
        pid = process.pid
        assert pid is not None
        started = time.monotonic()
    assert not alive(pid) and time.monotonic() - started < 5


async def test_kill_sync_ends_the_group_without_the_loop(tmp_path: Path) -> None:
    process = StandIn(tmp_path, mode="child")
    await process.start()
    try:
        await process.wait_ready(15)
        leader = process.pid
        assert leader is not None
        grandchild = int((tmp_path / "grandchild").read_text())
        process.kill_sync(timeout=5)  # blocks the loop, as an atexit handler would
        assert not alive(leader) and not alive(grandchild)
        await asyncio.sleep(0.3)
        assert process.starts() == [leader] and not process.ready
    finally:
        await process.stop()


# A real vLLM is started, served through, killed, restarted and stopped by
# tests/server/test_serve_embedded.py; float32 without LoRA slots is what the shared real server
# runs on a CPU without native bf16 (server.backend.tuning), so it is not started a third time here.
