"""The ``sharpen`` command, run in-process; uvicorn.run is replaced so nothing binds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from server import cli
from server.app import HotPath
from server.backend.weights import PACKAGED
from server.connection import HeadDeadlineProtocol
from server.h1 import H1Transport
from server.pool import UpstreamPool
from server.transport import HttpxTransport


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in list(os.environ):
        if k.upper().startswith("SHARPEN_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Calls to uvicorn.run, which never binds here."""
    calls: list[dict[str, Any]] = []

    def run(app: Any, **kw: Any) -> None:
        calls.append({"app": app, **kw})

    monkeypatch.setattr(uvicorn, "run", run)
    return calls


UP = ["--upstream", "http://127.0.0.1:9/v1"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_public_bind_without_keys_exits_2(host: str, served: list[dict[str, Any]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--host", host, *UP]) == 2
    err = capsys.readouterr().err
    assert f"refusing to bind {host} with no API keys" in err
    assert "--insecure" in err and "api_keys" in err
    assert served == []


def test_public_bind_without_keys_from_config_exits_2(tmp_path: Path, served: list[dict[str, Any]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("host: 0.0.0.0\nupstream:\n  url: http://127.0.0.1:9/v1\n")
    assert cli.main(["serve", "--config", str(cfg)]) == 2
    assert "refusing to bind 0.0.0.0" in capsys.readouterr().err
    assert served == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_bind_without_keys_serves(host: str, served: list[dict[str, Any]]) -> None:
    assert cli.main(["serve", "--host", host, "--port", "8123", *UP]) == 0
    (call,) = served
    assert call["host"] == host and call["port"] == 8123
    assert isinstance(call["app"], HotPath)
    assert call["app"].services.upstream.base_url == "http://127.0.0.1:9/v1"
    assert issubclass(call["http"], HeadDeadlineProtocol) and call["http"].head_timeout_s == 10.0


def test_public_bind_with_insecure_serves(served: list[dict[str, Any]]) -> None:
    assert cli.main(["serve", "--host", "0.0.0.0", "--insecure", *UP]) == 0
    assert served[0]["host"] == "0.0.0.0"


def test_public_bind_with_keys_from_env_serves(monkeypatch: pytest.MonkeyPatch, served: list[dict[str, Any]]) -> None:
    monkeypatch.setenv("SHARPEN_API_KEYS", '{"sk-a": "tenant-a"}')
    assert cli.main(["serve", "--host", "0.0.0.0", *UP]) == 0
    app = served[0]["app"]
    assert app.services.auth.enabled


def test_cli_flags_override_config_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           served: list[dict[str, Any]]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9100\nupstream:\n  url: http://from-yaml/v1\n  retries: 7\n")
    monkeypatch.setenv("SHARPEN_UPSTREAM__CLIENT", "aiohttp")
    assert cli.main(["serve", "--config", str(cfg), "--port", "9200", "--upstream", "http://from-cli/v1",
                     "--upstream-client", "httpx"]) == 0
    (call,) = served
    assert call["port"] == 9200
    upstream = call["app"].services.upstream
    assert upstream.base_url == "http://from-cli/v1"
    assert upstream.settings.retries == 7  # the rest of the YAML's upstream section stays
    assert isinstance(upstream._transport, HttpxTransport)


def test_config_alone_is_used(tmp_path: Path, served: list[dict[str, Any]]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9300\nupstream:\n  url: http://from-yaml/v1\n")
    assert cli.main(["serve", "--config", str(cfg)]) == 0
    assert served[0]["port"] == 9300
    assert served[0]["host"] == "127.0.0.1"
    assert served[0]["app"].services.upstream.base_url == "http://from-yaml/v1"
    assert isinstance(served[0]["app"].services.upstream._transport, H1Transport)  # the default


def test_models_list_prints_the_packaged_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(PACKAGED) >= 2
    names = [line.split("\t")[0] for line in lines]
    assert names == list(PACKAGED)
    assert "qwen2.5-coder-0.5b-instruct" in names and "smollm2-135m-instruct" in names
    for line in lines:
        name, size, parts = line.split("\t")
        assert size.endswith(" MB GGUF") and int(size.split()[0]) == round(PACKAGED[name].size / 1e6)
        assert parts == f"{len(PACKAGED[name].parts)} package(s)"


@pytest.mark.parametrize("argv", [[], ["serve", "--upstream-client", "curl"], ["models"], ["models", "delete"],
                                  ["serve", "--port", "eighty"], ["frobnicate"]])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: sharpen" in capsys.readouterr().err


def test_is_loopback() -> None:
    assert cli._is_loopback("127.0.0.1") and cli._is_loopback("::1") and cli._is_loopback("localhost")
    assert not cli._is_loopback("0.0.0.0") and not cli._is_loopback("::") and not cli._is_loopback("host.lan")


def test_upstream_repeated_is_a_pool_of_replicas(tmp_path: Path, served: list[dict[str, Any]]) -> None:
    assert cli.main(["serve", "--upstream", "http://a:8000/v1", "--upstream", "http://b:8000/v1/",
                     "--role", "replica"]) == 0
    (call,) = served
    services = call["app"].services
    assert isinstance(services.upstream, UpstreamPool) and services.role == "replica"
    assert [r.label for r in services.upstream.replicas] == ["http://a:8000/v1", "http://b:8000/v1"]


def test_a_list_in_the_config_is_a_pool_too(tmp_path: Path, served: list[dict[str, Any]]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstream:\n  urls: [http://a:8000/v1, http://b:8000/v1]\n")
    assert cli.main(["serve", "--config", str(cfg)]) == 0
    assert isinstance(served[0]["app"].services.upstream, UpstreamPool)
