"""Runs sharpen's app on a loopback port in a background thread, for tests.

The app is the real one (``server.app.create_app``) served by real uvicorn, so tests exercise
HTTP, streaming and disconnects exactly as clients see them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import uvicorn

from server.app import Backend, HotPath, create_app
from server.connection import with_head_timeout
from server.settings import Settings, load_settings

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ProxyServer:
    """sharpen in front of ``upstream_url`` (or a managed ``backend``) on 127.0.0.1."""

    def __init__(self, upstream_url: str | None = None, *, backend: Backend | None = None,
                 **settings: Any) -> None:
        if upstream_url is not None:
            settings.setdefault("upstream", {})["url"] = upstream_url
        self.settings: Settings = load_settings(**settings)
        self.port = free_port()
        self.app: HotPath = create_app(self.settings, backend=backend)
        # the connection protocol `sharpen serve` runs (departures, one write per answer)
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, loop="asyncio",
                             http=with_head_timeout(self.settings.header_timeout_s),
                             log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(cfg)
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's loop, once started
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self._server.serve()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Runs a coroutine on the app's loop (e.g. a call on one of its services) and waits."""
        assert self.loop is not None, "not started"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.root + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("sharpen did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
