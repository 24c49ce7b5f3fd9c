"""Strategy names to classes, and strict validation of a request's strategy choice."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from protocol.errors import InvalidRequest
from protocol.wire import first_problem
from strategies.base import Caps, Strategy


class StrategyRegistry:
    """Builds a strategy for one request from a name or ``{"name": ..., **options}``."""

    def __init__(self, strategies: Iterable[type[Strategy[Any]]]) -> None:
        self._classes = {s.name: s for s in strategies}

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def build(self, spec: str | dict[str, Any], *, endpoint: str = "/chat/completions",
              defaults: Mapping[str, dict[str, Any]] | None = None, caps: Caps | None = None) -> Strategy[Any]:
        """Raises ``InvalidRequest`` (param ``strategy``) for unknown names or bad options.
        ``defaults`` maps a strategy name to the options it gets unless the request sets them."""
        if isinstance(spec, str):
            name, options = spec, {}
        elif isinstance(spec, dict):
            options = dict(spec)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise InvalidRequest("'strategy' needs a 'name'.", param="strategy")
        else:
            raise InvalidRequest("'strategy' must be a name or an object with a 'name'.", param="strategy")
        cls = self._classes.get(name)
        if cls is None:
            raise InvalidRequest(
                f"Unknown strategy '{name}'. Valid strategies: {', '.join(self.names())}.", param="strategy"
            )
        if endpoint not in cls.endpoints:
            raise InvalidRequest(f"The strategy '{name}' does not apply to {endpoint}.", param="strategy")
        try:
            opts = cls.Options.model_validate({**(defaults or {}).get(name, {}), **options})
        except ValidationError as exc:
            field, msg, _ = first_problem(exc)
            raise InvalidRequest(
                f"Invalid option '{field}' for strategy '{name}': {msg}.", param=f"strategy.{field}"
            ) from None
        caps = caps or Caps()
        strategy = cls(cls.fit(opts, caps))
        strategy.check(caps)
        return strategy

    def check_defaults(self, defaults: Mapping[str, dict[str, Any]], caps: Caps | None = None) -> None:
        """Raises ``ValueError`` naming the strategy and option when a configured default (e.g.
        calibrated weights from ``sharpen calibrate --weights``) is invalid: at start-up, not as
        a 400 on every request."""
        for name in defaults:
            if name not in self._classes:
                raise ValueError(f"strategies.options names an unknown strategy {name!r} "
                                 f"(valid: {', '.join(self.names())})")
            try:
                self.build(name, defaults=defaults, caps=caps)
            except InvalidRequest as exc:
                raise ValueError(f"strategies.options.{name}: {exc.message}") from None
