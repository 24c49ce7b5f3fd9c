"""What the layers above may ask of an upstream OpenAI-compatible server.

The concrete client (``server.upstream.Upstream``) satisfies these protocols; strategies and the
adaptation loop are written against them, so they never import the server, and tests can hand
them an in-process fake (``tests/fakes/transport.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol


class Reply(Protocol):
    """An upstream answer once its headers are in."""

    headers: Mapping[str, str]  # case-insensitive lookups ("content-type")

    async def read(self) -> bytes:
        """The whole body."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (for streams)."""
        ...

    async def close(self) -> None:
        """Releases the connection without reading the rest."""
        ...


class UpstreamAPI(Protocol):
    """The part of the upstream client strategies may use.

    Contract: ``request`` returns once the upstream answered with a 2xx status; an error status
    raises ``protocol.errors.UpstreamStatusError``, an unreachable upstream ``UpstreamError``.
    ``root=True`` addresses a path outside the ``/v1`` prefix.
    """

    async def request(self, method: str, path: str, body: bytes | None = None, *, root: bool = False) -> Reply: ...


class AdapterHost(UpstreamAPI, Protocol):
    """An upstream that can load LoRA adapters at run time (vLLM with ``--enable-lora``)."""

    async def load_lora_adapter(self, name: str, path: str) -> None: ...

    async def unload_lora_adapter(self, name: str) -> None: ...
