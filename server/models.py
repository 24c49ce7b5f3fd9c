"""The models a client may name, and the upstream model each maps to."""

from __future__ import annotations

import logging
import time
from typing import Any

from protocol.errors import ModelNotFound, SharpenError, UpstreamError
from server.redact import clip
from server.upstream import Upstream

log = logging.getLogger(__name__)


class ModelRegistry:
    """Knows the upstream's models (base and loaded adapters) and sharpen's aliases.

    The upstream list is fetched at start and refreshed when a client names a model it does
    not know (at most once a second), so adapters loaded behind sharpen's back still resolve.
    """

    _REFRESH_MIN_INTERVAL = 1.0

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._cards: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, str] = {}
        self._default: str | None = None
        self._refreshed_at = 0.0
        self._failure: SharpenError | None = None  # why the last refresh failed

    async def refresh(self) -> None:
        """Reloads the upstream's model list; keeps the old one if the upstream fails."""
        self._refreshed_at = time.monotonic()
        try:
            data = await self._upstream.get_json("/models")
        except SharpenError as exc:
            log.warning("could not list upstream models: %s", exc.message)
            self._failure = exc
            return
        self._failure = None
        cards = {str(c["id"]): c for c in data.get("data", []) if isinstance(c, dict) and "id" in c}
        self._cards = cards
        bases = [k for k, c in cards.items() if not c.get("parent")]
        self._default = bases[0] if bases else next(iter(cards), None)

    def set_alias(self, alias: str, target: str) -> None:
        self._aliases[alias] = target

    @property
    def default(self) -> str | None:
        return self._default

    def lookup(self, name: str | None) -> str | None:
        """The upstream model for ``name`` (the default for None), or None if unknown."""
        if name is None:
            return self._default
        if name in self._cards:
            return name
        return self._aliases.get(name)

    async def resolve(self, name: str | None) -> str:
        found = self.lookup(name)
        if found is None and time.monotonic() - self._refreshed_at > self._REFRESH_MIN_INTERVAL:
            await self.refresh()
            found = self.lookup(name)
        if found is None:
            if self._failure is not None:
                # Not knowing the model because the upstream cannot be asked is not a 404.
                raise UpstreamError(f"The upstream's models could not be listed: {self._failure.message}")
            if name is None:
                raise ModelNotFound("The upstream serves no model yet.", param="model")
            raise ModelNotFound(f"The model '{clip(name)}' does not exist.", param="model")
        return found

    def cards(self) -> list[dict[str, Any]]:
        """The upstream's models (with ``parent`` for adapters) plus sharpen's aliases."""
        out = list(self._cards.values())
        for alias, target in self._aliases.items():
            if alias not in self._cards:
                out.append({"id": alias, "object": "model", "created": 0, "owned_by": "sharpen",
                            "root": target, "parent": target})
        return out
