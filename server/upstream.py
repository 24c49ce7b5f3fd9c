"""The one shared client of the upstream OpenAI-compatible server (vLLM or any other).

Adds what the raw transport lacks: the base URL and upstream key, retries before anything has
reached the client, the first-byte and idle-between-chunks timeouts, and the translation of
upstream error statuses into ``UpstreamStatusError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from protocol.errors import UpstreamConnectError, UpstreamError, UpstreamStatusError, UpstreamTimeout
from server.settings import UpstreamSettings
from server.transport import Transport, TransportResponse, make_transport

_RETRY_STATUSES = frozenset({502, 503, 504})


class UpstreamReply:
    """A successful (2xx) upstream response with its headers in; read it or stream it."""

    def __init__(self, resp: TransportResponse, idle: float) -> None:
        self._resp = resp
        self._idle = idle
        self._bounded = resp.bound_waits(idle)  # the transport times its own waits (server.h1)
        self.status = resp.status
        self.headers = resp.headers

    async def read(self) -> bytes:
        try:
            if self._bounded:
                return await self._resp.read()
            async with asyncio.timeout(self._idle):
                return await self._resp.read()
        except TimeoutError:
            await self._resp.close()
            raise UpstreamTimeout(f"upstream sent no body within {self._idle:g} s") from None

    async def json(self) -> dict[str, Any]:
        raw = await self.read()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("upstream answer is not valid JSON") from None
        if not isinstance(data, dict):
            raise UpstreamError("upstream answer is not a JSON object")
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive; raises ``UpstreamTimeout`` when the upstream goes quiet."""
        read, buffered = self._resp.read_chunk, self._resp.read_buffered
        idle, bounded = self._idle, self._bounded
        try:
            while True:
                # What arrived while the last chunk was being written goes out as one chunk, with
                # no timer: a timeout per chunk costs more than the write when tokens pile up.
                data = buffered()
                if not data:
                    # The timeout covers only the wait for the upstream, not the client's reading.
                    if bounded:
                        data = await read()
                    else:
                        async with asyncio.timeout(idle):
                            data = await read()
                    if not data:
                        return
                yield data
        except TimeoutError:
            raise UpstreamTimeout(f"upstream went quiet for {idle:g} s mid-stream") from None
        finally:
            await self._resp.close()

    async def close(self) -> None:
        await self._resp.close()


class Upstream:
    """Talks to one upstream base URL (ending in ``/v1``) through one pooled transport."""

    def __init__(self, base_url: str, settings: UpstreamSettings, transport: Transport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self._transport = transport or make_transport(
            settings.client, max_connections=settings.max_connections, connect_timeout=settings.timeouts.connect
        )
        self._headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"

    @property
    def root_url(self) -> str:
        """The server root (``/health``, ``/metrics`` and vLLM's LoRA routes live there)."""
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    async def request(self, method: str, path: str, body: bytes | None = None, *, root: bool = False) -> UpstreamReply:
        """Sends, retrying connection failures and 502-504 while nothing has reached the client.

        ``path`` is relative to the base URL (``/chat/completions``), or to the root with ``root``.
        Error statuses raise ``UpstreamStatusError`` carrying the upstream's message.
        """
        url = (self.root_url if root else self.base_url) + path
        t = self.settings.timeouts
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                async with asyncio.timeout(t.first_byte):
                    resp = await self._transport.send(method, url, body, self._headers)
            except TimeoutError:
                raise UpstreamTimeout(f"upstream did not answer within {t.first_byte:g} s") from None
            except UpstreamConnectError:
                if last:
                    raise
                await asyncio.sleep(self.settings.retry_backoff * (2**attempt))
                continue
            if resp.status < 400:
                return UpstreamReply(resp, t.idle)
            if resp.status in _RETRY_STATUSES and not last:
                await resp.close()
                await asyncio.sleep(self.settings.retry_backoff * (2**attempt))
                continue
            try:
                async with asyncio.timeout(t.idle):
                    raw = await resp.read()
            except (TimeoutError, UpstreamError):
                raw = b""
            finally:
                await resp.close()
            raise UpstreamStatusError.from_upstream(resp.status, raw)
        raise AssertionError("unreachable")  # pragma: no cover

    async def forward(self, method: str, path: str, body: bytes | None, headers: dict[str, str], *,
                      root: bool = False) -> UpstreamReply:
        """Sends a client's request on as it came, and returns the answer whatever its status:
        the forwarded routes pass the upstream's own errors through untouched. Only connection
        failures are retried (nothing reached the upstream then); a 5xx is the client's to see.
        ``headers`` replace the JSON defaults (a multipart upload keeps its content type)."""
        url = (self.root_url if root else self.base_url) + path
        sent = {**headers, **({"Authorization": self._headers["Authorization"]} if "Authorization" in self._headers
                              else {})}
        t = self.settings.timeouts
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(t.first_byte):
                    resp = await self._transport.send(method, url, body, sent)
            except TimeoutError:
                raise UpstreamTimeout(f"upstream did not answer within {t.first_byte:g} s") from None
            except UpstreamConnectError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(self.settings.retry_backoff * (2**attempt))
                continue
            return UpstreamReply(resp, t.idle)
        raise AssertionError("unreachable")  # pragma: no cover

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POSTs a JSON body and returns the JSON answer (non-streamed calls, control calls)."""
        reply = await self.request("POST", path, orjson.dumps(body))
        return await reply.json()

    async def get_json(self, path: str) -> dict[str, Any]:
        reply = await self.request("GET", path)
        return await reply.json()

    async def healthy(self) -> bool:
        """True when the upstream's ``/health`` (or, lacking one, ``/v1/models``) answers 2xx."""
        for path, root in (("/health", True), ("/models", False)):
            try:
                reply = await self.request("GET", path, root=root)
                await reply.read()
                return True
            except UpstreamStatusError as exc:
                if exc.http_status != 404:
                    return False
            except UpstreamError:
                return False
        return False

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Loads a LoRA adapter into vLLM at run time under ``name`` (never reuse a name)."""
        reply = await self.request(
            "POST", "/v1/load_lora_adapter", orjson.dumps({"lora_name": name, "lora_path": path}), root=True
        )
        await reply.read()

    async def unload_lora_adapter(self, name: str) -> None:
        reply = await self.request("POST", "/v1/unload_lora_adapter", orjson.dumps({"lora_name": name}), root=True)
        await reply.read()

    async def aclose(self) -> None:
        await self._transport.aclose()
