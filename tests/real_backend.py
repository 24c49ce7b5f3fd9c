"""A real vLLM server for tests, started once per session from synchronous code.

Wire it to a session fixture in ``tests/conftest.py``::

    @pytest.fixture(scope="session")
    def real_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVLLM]:
        with RealVLLM(tmp_path_factory.mktemp("real-vllm")) as backend:
            yield backend

Tests then talk to ``real_vllm.base_url`` (OpenAI-compatible, ``.../v1``) with model
``real_vllm.served_name``; ``real_vllm.model_path`` is the Hugging Face folder (a base for LoRA
training) and ``real_vllm.log_path`` vLLM's log, worth printing when a test fails.

The weights are cached in ``Settings().cache_dir``, so reruns on the same machine skip the fetch
and conversion (~25 s for the 135M model); the server itself takes ~25-40 s to start.
"""

from __future__ import annotations

import asyncio
import atexit
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from server.backend.vllm_process import VLLMProcess
from server.backend.weights import PreparedModel, prepare_model
from server.settings import BackendSettings, Settings

T = TypeVar("T")

REAL_MODEL = "smollm2-135m-instruct"


def real_backend_settings(**overrides: Any) -> BackendSettings:
    """The settings the shared test server runs with: small, and with room for two rank-8 adapters."""
    values: dict[str, Any] = {
        "model": REAL_MODEL,
        "kv_cache_gib": 1,
        "max_model_len": 2048,
        "max_lora_rank": 8,
        "max_loras": 2,
        "start_timeout": 600.0,
    }
    return BackendSettings.model_validate(values | overrides)


class RealVLLM:
    """A context manager running a real ``VLLMProcess`` on an event loop in a background thread.

    Sync code (a session-scoped fixture) can hold it across tests that each run their own event
    loop: the child process and its supervisor live on this object's loop, not on a test's. On
    exit it stops the server; an atexit hook also kills it should the session end abruptly.
    """

    def __init__(self, tmp_root: Path, *, settings: BackendSettings | None = None) -> None:
        self.settings = settings or real_backend_settings()
        self.tmp_root = tmp_root
        self.log_path = tmp_root / "vllm.log"
        self.model: PreparedModel | None = None
        self._process: VLLMProcess | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def process(self) -> VLLMProcess:
        if self._process is None:
            raise RuntimeError("RealVLLM is not running; use it as a context manager")
        return self._process

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def served_name(self) -> str:
        return self.process.served_name

    @property
    def model_path(self) -> Path:
        return self.process.model.path

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Self:
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        self.model = prepare_model(self.settings.model, Settings().cache_dir, python=sys.executable)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="real-vllm", daemon=True)
        self._thread.start()
        self._process = VLLMProcess(self.settings, self.model, self.log_path, python=sys.executable)
        atexit.register(self._process.kill_sync)
        try:
            self._run(self._process.start())
            self._run(self._process.wait_ready(self.settings.start_timeout))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops the server and the background loop; safe to call more than once."""
        loop, thread, process = self._loop, self._thread, self._process
        try:
            if process is not None and loop is not None and loop.is_running():
                self._run(process.stop())
        finally:
            if process is not None:
                process.kill_sync()  # a no-op after a clean stop; the fallback otherwise
                atexit.unregister(process.kill_sync)
            if loop is not None:
                loop.call_soon_threadsafe(loop.stop)
                if thread is not None:
                    thread.join(timeout=10)
                if not loop.is_running():
                    loop.close()
            self._loop = self._thread = None
