"""The floor of a Python relay: a bare ASGI app on uvicorn that forwards each request's body to
the upstream with one pooled aiohttp session and streams the answer back, with no logic at all.

    .venv/bin/python -m loadtest.relay --upstream http://127.0.0.1:PORT/v1 --port PORT

``loadtest/overhead.py --floor`` runs it beside sharpen in the same A/B rounds, so each run says
how much of the added latency any Python relay pays on that host (uvicorn's parser, the event
loop, two sockets per request) and how much is sharpen's own.
"""

from __future__ import annotations

import argparse
from collections.abc import MutableMapping
from typing import Any

import aiohttp
import uvicorn


class Relay:
    """ASGI app: POSTs go to ``upstream`` + path (minus ``/v1``); ``/health`` answers 200."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self._session is not None:
                await self._session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        if self._session is None:  # bound to uvicorn's loop, so made on the first request
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        url = self._upstream + scope["path"].removeprefix("/v1")
        async with self._session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            ctype = r.headers.get("Content-Type", "application/json").encode()
            await send({"type": "http.response.start", "status": r.status, "headers": [(b"content-type", ctype)]})
            while chunk := await r.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="base URL with /v1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    uvicorn.run(Relay(a.upstream), host="127.0.0.1", port=a.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
