"""A sharpen started in this process on a loopback port, for as long as a command needs it
(``sharpen eval``); the CLI hands it to the evals, which never import the server."""

from __future__ import annotations

import atexit
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import httpx
import uvicorn

from server.app import create_app
from server.settings import load_settings


@contextmanager
def local_server(config: str | None, upstream: str | None) -> Iterator[str]:
    """Yields the base URL (…/v1) of a sharpen in front of ``upstream``, or of the embedded
    default backend when it is None; memory is off (an eval must not learn from itself)."""
    # role replica: it writes no memory and no adapters, and must not take the data folder's
    # lock from a `sharpen serve` started while it runs
    settings = load_settings(config=config, upstream={"url": upstream} if upstream else None,
                             memory={"enabled": False}, role="replica")
    backend = None
    if not settings.upstream.endpoints:
        from server.backend.vllm_process import VLLMProcess  # heavy: only without an upstream
        from server.backend.weights import prepare_model

        prepared = prepare_model(settings.backend.model, settings.cache_dir)
        backend = VLLMProcess(settings.backend, prepared, settings.log_dir / "vllm-eval.log")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings, backend=backend), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    # uvicorn in a thread installs no signal handlers, and the vLLM child has its own session:
    # SIGTERM's default (die at once) would leave the child serving with no parent. So SIGTERM
    # raises SystemExit in this (main) thread and the finally below stops the child.
    main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _exit) if main else None
    if backend is not None:
        atexit.register(backend.kill_sync)  # a no-op after a clean stop
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + settings.backend.start_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the in-process sharpen did not become ready")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if backend is not None:
            backend.kill_sync()  # the app's shutdown stops it; this is for a server that did not
            atexit.unregister(backend.kill_sync)
        if main:
            signal.signal(signal.SIGTERM, previous)


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
