"""Bounds on what a client sends, for every route: a body over the limit is refused as soon as
its declared length says so (before it is read), a body without a declared length is counted as
it arrives, and a body that stops arriving is dropped after ``read_timeout_s`` between two
chunks, so a slow or stalled client cannot hold a request (and its memory) open. A client that
leaves mid-upload is a ClientGone (a disconnect, logged as such), not a server error."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from protocol.errors import PayloadTooLarge, RequestTimeout
from server.streaming import ClientGone

Receive = Callable[[], Awaitable[dict[str, Any]]]


class BodyLimit:
    """The per-request body bounds; ``wrap`` returns the ``receive`` the app sees."""

    def __init__(self, max_bytes: int, read_timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is over the {self.max_bytes}-byte limit.")

    def declared_over(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                return value.isdigit() and int(value) > self.max_bytes
        return False

    def wrap(self, receive: Receive, *, count: bool = True) -> Receive:
        """``receive`` with a timeout per body chunk and (``count``) the size limit. Once the
        body is complete, receive passes through untouched: it then waits for the client's
        disconnect for as long as a streamed answer lasts."""
        seen = 0
        done = False

        async def bounded() -> dict[str, Any]:
            nonlocal seen, done
            if done:
                return await receive()
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"The request body did not arrive within {self.read_timeout_s:g} s.") from None
            if message["type"] == "http.disconnect":  # the client left mid-upload: not a server error
                raise ClientGone()
            if message["type"] != "http.request":
                done = True
                return message
            seen += len(message.get("body", b""))
            if count and seen > self.max_bytes:
                raise self.too_large()
            done = not message.get("more_body", False)
            return message

        return bounded
