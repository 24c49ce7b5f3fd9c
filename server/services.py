"""The services one app holds, built once from the settings."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from protocol.events import EventBus
from server.auth import Authenticator, Principal
from server.eval_reports import EvalReports
from server.forward import Forwarder
from server.metrics import Metrics
from server.models import ModelRegistry
from server.ownership import claim
from server.pool import UpstreamPool
from server.proxy import ProxyService
from server.redact import redact_url
from server.replay import Replay
from server.settings import Settings, inherited_environ
from server.status import StatusService
from server.traffic import Traffic
from server.upstream import Upstream
from strategies import builtin_strategies
from strategies.registry import StrategyRegistry

if TYPE_CHECKING:
    from adapt.service import AdaptationService
    from memory.service import MemoryService
    from server.experience import ExperienceRecorder

log = logging.getLogger(__name__)


class Services:
    """Everything a route needs, wired together; ``close`` releases what it holds."""

    _READY_TTL = 1.0  # /ready probes are cached briefly so a tight poll cannot load the upstream

    def __init__(self, settings: Settings, upstream: Upstream) -> None:
        self.settings = settings
        self.upstream = upstream
        self.metrics = Metrics()
        self.auth = Authenticator(settings)
        self.models = ModelRegistry(upstream)
        self.strategies = StrategyRegistry(builtin_strategies())
        self.events = EventBus()
        self.role, self._lock, self.not_primary = claim(settings.data_dir, settings.role)
        self.memory, self.recorder = self._memory(settings)
        self.replay = Replay(self.memory, settings.memory) if self.memory is not None else None
        self.adapt = self._adaptation(settings)
        if self.adapt is not None:
            self.adapt.models_changed = self.models.refresh
        self.traffic = Traffic(window_s=settings.ui.traffic_window_s)
        self.proxy = ProxyService(settings, upstream, self.models, self.strategies, self.metrics, self.events,
                                  self.replay, self.adapt, self.traffic)
        self.forwarder = Forwarder(upstream, self.metrics, max_concurrency=settings.max_concurrency,
                                   read_body=self.proxy.read_body, traffic=self.traffic, adapt=self.adapt)
        self.status = StatusService(
            self.traffic, EvalReports([*settings.ui.eval_dirs, settings.data_dir / "evals"]), self.readiness,
            refresh_s=settings.ui.refresh_s, memory=self.memory, replay=self.replay, adapt=self.adapt,
            strategies=self.strategies.names(),
            presets={k: p.model_dump() for k, p in settings.strategies.presets.items()})
        self._ready: tuple[float, bool] = (0.0, False)

    def _memory(self, settings: Settings) -> tuple[MemoryService | None, ExperienceRecorder | None]:
        """The experience memory, when enabled and its libraries (faiss, numpy) are installed."""
        s = settings.memory
        if not s.enabled or self.role == "replica":  # the primary owns the memory's files
            return None, None
        try:
            from memory.service import MemoryConfig, MemoryService
            from server.experience import ExperienceRecorder, UpstreamDistiller
        except ImportError as exc:
            log.warning("memory disabled: %s (install the 'memory' extra)", exc)
            return None, None
        config = MemoryConfig(directory=settings.data_dir / "memory", embedder=s.embedder,
                              embed_threads=s.embed_threads,
                              max_entries_per_tenant=s.max_entries_per_tenant, max_text_chars=s.max_text_chars,
                              dedup_similarity=s.dedup_similarity, hnsw_threshold=s.hnsw_threshold,
                              persist_interval_s=s.persist_interval_s)
        memory = MemoryService(config)
        recorder = ExperienceRecorder(memory, self.events, s)
        if s.distill:
            memory.distiller = UpstreamDistiller(self.upstream, recorder.model_of)
        return memory, recorder

    def _adaptation(self, settings: Settings) -> AdaptationService | None:
        if not settings.adapt.enabled:
            return None
        from adapt.service import AdaptationService
        from adapt.trainer import LocalProcessTrainer, Trainer

        embedder = self.memory.embedder if self.memory is not None else None
        if embedder is None and settings.adapt.scope == "near":  # the scope needs meaning, memory or not
            from memory.embedder import make_embedder

            embedder = make_embedder(settings.memory.embedder, threads=settings.memory.embed_threads)
        teacher = None
        if settings.adapt.teacher_url:
            teacher = Upstream(settings.adapt.teacher_url, settings.upstream)
        trainer: Trainer = LocalProcessTrainer(environ=inherited_environ())
        if settings.adapt.trainer == "ray":
            from adapt.ray_trainer import RayJobTrainer

            assert settings.adapt.ray_address is not None  # the settings validate it
            trainer = RayJobTrainer(settings.adapt.ray_address, python=settings.adapt.ray_python,
                                    runtime_env=settings.adapt.ray_runtime_env)
        args = (settings.adapt, settings.data_dir / "adapt", self.upstream, self.events)
        if self.role == "replica":  # the primary adapts; this process follows its routes
            from adapt.follower import ReplicaAdaptation

            return ReplicaAdaptation(*args, embedder=embedder, follow_s=settings.replica_follow_s,
                                     not_primary=self.not_primary)
        svc = AdaptationService(*args, embedder=embedder, teacher=teacher, trainer=trainer)
        svc.on_cycle = lambda job: self.metrics.record_cycle(job.tenant, job.status, job.report)
        return svc

    async def start(self) -> None:
        if isinstance(self.upstream, UpstreamPool):
            self.upstream.metrics = self.metrics
            await self.upstream.start()
        if self.memory is not None and self.recorder is not None:
            await self.memory.start()
            await self.recorder.start()

    async def upstream_up(self) -> None:
        """Once the upstream answers: learn its models, then restore the active adapters."""
        await self.models.refresh()
        if self.adapt is not None and self.adapt.base is None and self.models.default is not None:
            await self.adapt.start(self.models.default)

    def authenticate(self, request: Request) -> Principal:
        return self.auth.authenticate(request.headers.get("authorization"))

    async def upstream_ready(self) -> bool:
        at, ok = self._ready
        if time.monotonic() - at < self._READY_TTL:
            return ok
        ok = await self.upstream.healthy()
        self._ready = (time.monotonic(), ok)
        self.metrics.upstream_ready.set(1 if ok else 0)
        return ok

    async def readiness(self, admin: bool = False) -> tuple[bool, dict[str, Any]]:
        """What ``/ready`` answers: whether the upstream answers, and where it is (each replica's
        state with several; adapter names, a tenant's business, only for the admin)."""
        ok = await self.upstream_ready()
        body: dict[str, Any] = {"status": "ready" if ok else "waiting for upstream"}
        if isinstance(self.upstream, UpstreamPool):
            body["replicas"] = [r if admin else {**r, "adapters": len(r["adapters"])} for r in self.upstream.states()]
        else:
            body["upstream"] = redact_url(self.upstream.base_url)
        return ok, body

    def model_cards(self, tenant: str) -> list[dict[str, Any]]:
        """The upstream's models the tenant may use (not other tenants' adapters), each one's
        ``model@strategy`` variants, then the configured presets; variants and presets say
        their strategy in ``strategy``."""
        cards = [c for c in self.models.cards() if self.adapt is None or self.adapt.visible(tenant, str(c["id"]))]
        out = list(cards)
        for card in cards:
            for name in self.strategies.names():
                if name != "passthrough":
                    out.append({"id": f"{card['id']}@{name}", "object": "model", "created": card.get("created", 0),
                                "owned_by": "sharpen", "root": card.get("root", card["id"]), "parent": card["id"],
                                "strategy": name})
        taken = {str(c["id"]) for c in out}
        for alias, preset in self.settings.strategies.presets.items():
            model = preset.model or self.models.default
            if alias in taken or model is None or (self.adapt is not None and not self.adapt.visible(tenant, model)):
                continue
            out.append({"id": alias, "object": "model", "created": 0, "owned_by": "sharpen", "root": model,
                        "parent": model, "strategy": preset.strategy or self.settings.strategies.default,
                        "preset": True})
        return out

    async def close(self) -> None:
        if self.adapt is not None:
            await self.adapt.stop()
        if self.recorder is not None:
            await self.recorder.stop()
        if self.memory is not None:
            await self.memory.stop()
        await self.upstream.aclose()
        if self._lock is not None:
            self._lock.release()
