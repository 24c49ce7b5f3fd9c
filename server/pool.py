"""Several replicas of one model behind the one upstream interface (``--upstream`` repeated).

Balancing: least outstanding requests, with prompt-prefix affinity. Every call of one strategy
request (candidates, verifiers, refinements) goes through a ``Pin`` carried in its context, so
they all land on the replica that holds their prefix in its KV cache; the first call picks it by
rendezvous hashing of the prompt prefix (independent requests with one system prompt meet on one
replica), unless that replica has ``affinity_slack`` more requests in flight than the least
loaded one. A call that fails before anything reached the client (no connection, dropped before
the headers, 502-504) is retried on another replica, and the pin moves with it.

Health: a replica in service is checked every ``health_interval_s`` (``GET /v1/models``, which
also lists the adapters it holds); one that fails a call or a check is taken out and checked
again after ``backoff_s``, doubling up to ``backoff_max_s``. Adapters: ``load_lora_adapter``
loads on every replica and remembers the adapter; a replica that comes back (or restarted between
two checks and lost its adapters) gets them again, and until it holds an adapter no request for
that adapter goes to it. With one upstream URL none of this exists: the app uses a plain
``Upstream``, and the request path pays nothing for the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from typing import Any, Protocol

import orjson

from protocol.errors import UpstreamConnectError, UpstreamError, UpstreamStatusError
from server.replica import PoolReply, Replica, prefix_key
from server.settings import UpstreamSettings
from server.transport import Transport
from server.upstream import Upstream, UpstreamReply

log = logging.getLogger(__name__)

_FAILOVER_STATUSES = frozenset({502, 503, 504})


class PoolMetrics(Protocol):
    """Where the pool reports per replica (``server.metrics.Metrics`` implements it)."""

    def replica_call(self, replica: str, outcome: str) -> None: ...
    def replica_state(self, replica: str, up: bool, in_flight: int) -> None: ...


class Pin:
    """One strategy request's view of the pool: every call goes to the same replica (the one
    holding the prompt's prefix) unless it fails, in which case the pin moves."""

    __slots__ = ("key", "pool", "replica")

    def __init__(self, pool: UpstreamPool, key: int | None) -> None:
        self.pool = pool
        self.key = key
        self.replica: Replica | None = None

    async def request(self, method: str, path: str, body: bytes | None = None, *, root: bool = False) -> UpstreamReply:
        return await self.pool.send(method, path, body, root=root, pin=self)


class UpstreamPool(Upstream):
    """``Upstream``'s interface over several replicas (see the module docstring)."""

    def __init__(self, urls: list[str], settings: UpstreamSettings,
                 transports: dict[str, Transport] | None = None) -> None:
        # No ``super().__init__``: the pool holds no connection of its own, only its replicas'.
        self.settings = settings
        self.replicas = [Replica(u, settings, (transports or {}).get(u)) for u in urls]  # unique_urls'd
        self.base_url = self.replicas[0].upstream.base_url
        self.metrics: PoolMetrics | None = None
        self._wanted: dict[str, str] = {}  # adapter name -> path: to be held by every replica
        self._degraded = False  # a replica in service lacks a wanted adapter: check each call's model
        self._turn = 0
        self._task: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Future[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Checks every replica once (logging those that do not answer), then keeps checking."""
        await asyncio.gather(*(self._check(r) for r in self.replicas))
        up = [r.label for r in self.replicas if r.up]
        log.info("upstream pool: %d of %d replicas answer (%s)", len(up), len(self.replicas), ", ".join(up) or "none")
        self._task = asyncio.create_task(self._health_loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(r.upstream.aclose() for r in self.replicas), return_exceptions=True)

    # -- choosing a replica ------------------------------------------------------------------

    def pin(self, body: dict[str, Any]) -> Pin:
        """A pin for one request's calls, keyed by its prompt's prefix."""
        return Pin(self, prefix_key(body))

    def _choose(self, key: int | None, need: frozenset[str], tried: list[Replica]) -> Replica | None:
        cands = [r for r in self.replicas if r.up and r not in tried and need <= r.adapters]
        if not cands:
            return None
        low = min(r.in_flight for r in cands)
        if key is not None and len(cands) > 1:
            best = max(cands, key=lambda r: r.score(key))
            if best.in_flight <= low + self.settings.affinity_slack:
                return best
        least = [r for r in cands if r.in_flight == low]
        self._turn += 1  # ties go round: sequential calls still spread
        return least[self._turn % len(least)]

    def _needs(self, method: str, path: str, body: bytes | None) -> frozenset[str]:
        """The adapters a replica must hold to take this call: the one it names, or all of them
        for the model list. Looked at only while some replica in service lacks one."""
        if not self._degraded:
            return frozenset()
        if method == "GET" and path == "/models":
            return frozenset(self._wanted)
        try:
            data = orjson.loads(body or b"")
        except orjson.JSONDecodeError:
            return frozenset()
        model = data.get("model") if isinstance(data, dict) else None
        return frozenset([model]) if isinstance(model, str) and model in self._wanted else frozenset()

    async def request(self, method: str, path: str, body: bytes | None = None, *, root: bool = False) -> UpstreamReply:
        """An independent call (model list, adaptation, distillation): least outstanding."""
        return await self.send(method, path, body, root=root, pin=None)

    async def send(self, method: str, path: str, body: bytes | None, *, root: bool, pin: Pin | None) -> UpstreamReply:
        """Sends to the pinned (or a chosen) replica; fails over while nothing has reached the client."""
        need = self._needs(method, path, body)
        tried: list[Replica] = []
        errors: list[str] = []
        while True:
            r = pin.replica if pin is not None else None
            if r is None or not r.up or r in tried or not need <= r.adapters:
                r = self._choose(pin.key if pin is not None else None, need, tried)
            if r is None:
                r = self._last_resort(tried, need)
                if r is None:
                    detail = "; ".join(errors) or ", ".join(f"{x.label}: {x.error or 'down'}" for x in self.replicas)
                    what = f" holding {', '.join(sorted(need))}" if need else ""
                    raise UpstreamError(f"no upstream replica{what} answers ({detail})")
            if pin is not None:
                pin.replica = r
            tried.append(r)
            r.in_flight += 1
            try:
                reply = await r.upstream.request(method, path, body, root=root)
            except UpstreamConnectError as exc:
                self._release(r)
                self._failed(r, exc.message)
                errors.append(f"{r.label}: {exc.message}")
                continue
            except UpstreamStatusError as exc:
                self._release(r)
                if exc.http_status in _FAILOVER_STATUSES:
                    self._failed(r, f"HTTP {exc.http_status}")
                    errors.append(f"{r.label}: HTTP {exc.http_status}")
                    continue
                lost = self._lost_adapter(r, exc, body)
                if lost:  # restarted since its last check: reload it there, answer from another
                    errors.append(f"{r.label}: lost adapter {lost}")
                    need = need | {lost}
                    continue
                self._count(r, "error")
                raise
            except BaseException:
                self._release(r)
                raise
            self._count(r, "ok")
            return PoolReply(reply, partial(self._release, r))

    def _lost_adapter(self, r: Replica, exc: UpstreamStatusError, body: bytes | None) -> str | None:
        """The adapter a 404 says this replica does not hold, though the pool thought it did."""
        if exc.http_status != 404 or not self._wanted or not body:
            return None
        try:
            model = orjson.loads(body).get("model")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        if not isinstance(model, str) or model not in self._wanted or model not in r.adapters:
            return None
        log.warning("upstream replica %s no longer holds adapter %s; loading it again", r.label, model)
        r.adapters.discard(model)
        self._update()
        task = asyncio.ensure_future(self._reload(r, model, self._wanted[model]))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        return model

    async def _reload(self, r: Replica, name: str, path: str) -> None:
        with contextlib.suppress(UpstreamError):
            await self._load_on(r, name, path)
        self._update()

    def _last_resort(self, tried: list[Replica], need: frozenset[str]) -> Replica | None:
        """With every replica out, one try on the one due back first (bounded by the connect
        timeout): a replica that has just come back serves, and a dead pool answers 502 fast."""
        if tried:
            return None
        out = [r for r in self.replicas if not r.up and need <= r.adapters]
        return min(out, key=lambda r: r.retry_at) if out else None

    def _release(self, r: Replica) -> None:
        r.in_flight -= 1
        if self.metrics is not None:
            self.metrics.replica_state(r.label, r.up, r.in_flight)

    def _count(self, r: Replica, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.replica_call(r.label, outcome)

    def _failed(self, r: Replica, reason: str) -> None:
        """Takes a replica out of service; the health loop tries it again after the backoff."""
        self._count(r, "failed")
        r.failures += 1
        r.error = reason
        delay = min(self.settings.backoff_s * 2 ** (r.failures - 1), self.settings.backoff_max_s)
        r.retry_at = time.monotonic() + delay
        if r.up:
            log.warning("upstream replica %s taken out: %s; checked again in %.1f s", r.label, reason, delay)
        r.up = False
        self._update()

    def _update(self) -> None:
        self._degraded = any(r.up and not self._wanted.keys() <= r.adapters for r in self.replicas)
        if self.metrics is not None:
            for r in self.replicas:
                self.metrics.replica_state(r.label, r.up, r.in_flight)

    # -- health --------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            due = [r for r in self.replicas
                   if (r.up and now - r.last_check >= self.settings.health_interval_s)
                   or (not r.up and now >= r.retry_at)]
            if due:
                await asyncio.gather(*(self._check(r) for r in due))

    async def _check(self, r: Replica) -> None:
        """``GET /v1/models`` on one replica: alive, and which adapters it holds."""
        r.last_check = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.timeouts.connect + 5):
                reply = await r.upstream.request("GET", "/models")
                data = orjson.loads(await reply.read())
            held = {str(c.get("id")) for c in data.get("data", []) if isinstance(c, dict)}
        except (TimeoutError, UpstreamError, orjson.JSONDecodeError, AttributeError) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else str(getattr(exc, "message", exc))
            if not r.checked:
                log.warning("upstream replica %s does not answer at start (%s); the others serve", r.label, reason)
            r.checked = True
            self._failed(r, f"health check: {reason}")
            return
        r.checked = True
        lost = r.adapters - held
        if lost:  # restarted between two checks: what it held is gone
            log.warning("upstream replica %s lost adapters %s (restarted?); loading them again", r.label,
                        sorted(lost))
        r.adapters &= held
        came_back = not r.up
        r.up, r.failures, r.error = True, 0, ""
        self._update()  # in service for the base model now; for an adapter once it holds it
        missing = {n: p for n, p in self._wanted.items() if n not in r.adapters}
        if missing:
            r.adapters |= {n for n in missing if n in held}
            await asyncio.gather(*(self._load_on(r, n, p) for n, p in missing.items() if n not in held))
        if came_back:
            log.info("upstream replica %s in service (%d adapters)", r.label, len(r.adapters))
        self._update()

    async def healthy(self) -> bool:
        """True while at least one replica is in service."""
        return any(r.up for r in self.replicas)

    def states(self) -> list[dict[str, Any]]:
        """Each replica's state for ``/ready``: up, syncing (up, adapters still loading), down."""
        out = []
        for r in self.replicas:
            state = ("up" if self._wanted.keys() <= r.adapters else "syncing") if r.up else "down"
            item: dict[str, Any] = {"url": r.label, "state": state, "in_flight": r.in_flight,
                                    "adapters": sorted(r.adapters)}
            if not r.up:
                item["error"] = r.error or "not checked yet"
                item["retry_in_s"] = round(max(r.retry_at - time.monotonic(), 0.0), 1)
            out.append(item)
        return out

    # -- adapters on every replica -------------------------------------------------------------

    async def _load_on(self, r: Replica, name: str, path: str) -> None:
        try:
            await r.upstream.load_lora_adapter(name, path)
        except UpstreamStatusError as exc:
            if exc.http_status != 400 or "already" not in exc.message.lower():
                log.error("loading adapter %s on %s failed: %s", name, r.label, exc.message)
                raise
        r.adapters.add(name)

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Loads on every replica in service; the others get it when they come back. Raises when
        no replica could load it."""
        self._wanted[name] = path
        up = [r for r in self.replicas if r.up]
        results = await asyncio.gather(*(self._load_on(r, name, path) for r in up), return_exceptions=True)
        self._update()
        errors = [e for e in results if isinstance(e, BaseException)]
        if up and len(errors) == len(up):
            self._wanted.pop(name, None)
            self._update()
            raise errors[0]
        if not up:
            self._wanted.pop(name, None)
            raise UpstreamError(f"no upstream replica answers to load adapter '{name}'")

    async def unload_lora_adapter(self, name: str) -> None:
        """Unloads everywhere (a replica that is down lost it or gets no reload of it)."""
        self._wanted.pop(name, None)
        holders = [r for r in self.replicas if name in r.adapters]
        for r in holders:
            r.adapters.discard(name)
        self._update()
        results = await asyncio.gather(*(r.upstream.unload_lora_adapter(name) for r in holders if r.up),
                                       return_exceptions=True)
        for r, res in zip([r for r in holders if r.up], results, strict=True):
            if isinstance(res, BaseException):
                log.info("unloading %s on %s: %s", name, r.label, getattr(res, "message", res))
