"""Settings: defaults, SHARPEN_ environment (nested with ``__``), the YAML config and overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pydantic
import pytest

from server.settings import DEFAULT_MODEL, Settings, inherited_environ, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in list(os.environ):
        if k.upper().startswith("SHARPEN_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    s = load_settings()
    assert (s.host, s.port, s.insecure) == ("127.0.0.1", 8000, False)
    assert s.api_keys == {} and s.admin_key is None
    assert s.upstream.url is None and s.upstream.client == "h1"
    assert s.upstream.timeouts.first_byte == 600 and s.upstream.timeouts.idle == 120
    assert s.backend.model == DEFAULT_MODEL
    assert s.cache_dir == tmp_path / "cache" / "sharpen"
    assert s.log_dir == tmp_path / "data" / "sharpen" / "logs"


def test_env_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPEN_PORT", "9001")
    monkeypatch.setenv("SHARPEN_HOST", "0.0.0.0")
    monkeypatch.setenv("SHARPEN_API_KEYS", '{"sk-a": "tenant-a"}')
    monkeypatch.setenv("SHARPEN_UPSTREAM__URL", "http://up:8001/v1/")
    monkeypatch.setenv("SHARPEN_UPSTREAM__CLIENT", "httpx")
    monkeypatch.setenv("SHARPEN_UPSTREAM__TIMEOUTS__IDLE", "3.5")
    monkeypatch.setenv("SHARPEN_BACKEND__KV_CACHE_GIB", "1")
    monkeypatch.setenv("SHARPEN_BACKEND__EXTRA_ARGS", '["--enforce-eager"]')
    monkeypatch.setenv("PORT", "1")  # no prefix: ignored
    s = load_settings()
    assert s.port == 9001 and s.host == "0.0.0.0"
    assert s.api_keys == {"sk-a": "tenant-a"}
    assert s.upstream.url == "http://up:8001/v1"  # trailing slash stripped
    assert s.upstream.client == "httpx"
    assert s.upstream.timeouts.idle == 3.5
    assert s.upstream.timeouts.first_byte == 600  # siblings keep their defaults
    assert s.backend.kv_cache_gib == 1.0 and s.backend.extra_args == ["--enforce-eager"]


def test_env_value_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPEN_UPSTREAM__CLIENT", "curl")
    with pytest.raises(pydantic.ValidationError):
        load_settings()


def test_yaml_config(tmp_path: Path) -> None:
    cfg = write(tmp_path / "sharpen.yaml", """
port: 9100
api_keys:
  sk-a: tenant-a
admin_key: sk-admin
max_body_bytes: 1024
upstream:
  url: http://up:1/v1
  timeouts:
    first_byte: 2
backend:
  max_loras: 4
""")
    s = load_settings(config=str(cfg))
    assert s.config == cfg
    assert s.port == 9100 and s.api_keys == {"sk-a": "tenant-a"} and s.admin_key == "sk-admin"
    assert s.max_body_bytes == 1024
    assert s.upstream.url == "http://up:1/v1" and s.upstream.timeouts.first_byte == 2
    assert s.upstream.timeouts.idle == 120
    assert s.backend.max_loras == 4


def test_yaml_config_named_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "port: 9200\n")
    monkeypatch.setenv("SHARPEN_CONFIG", str(cfg))
    assert load_settings().port == 9200


def test_priority_overrides_then_env_then_yaml_then_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", """
host: 10.0.0.1
port: 9100
log_level: debug
upstream:
  url: http://from-yaml/v1
  retries: 5
  timeouts:
    idle: 7
""")
    monkeypatch.setenv("SHARPEN_PORT", "9200")
    monkeypatch.setenv("SHARPEN_UPSTREAM__URL", "http://from-env/v1")
    s = load_settings(config=str(cfg), host="127.0.0.2", port=None)
    assert s.host == "127.0.0.2"  # override beats YAML
    assert s.port == 9200  # env beats YAML; a None override is ignored
    assert s.log_level == "debug"  # YAML beats defaults
    assert s.upstream.url == "http://from-env/v1"
    assert s.upstream.retries == 5 and s.upstream.timeouts.idle == 7  # nested YAML merged, not replaced

    s = load_settings(config=str(cfg), upstream={"url": "http://from-cli/v1"})
    assert s.upstream.url == "http://from-cli/v1"
    assert s.upstream.retries == 5 and s.upstream.timeouts.idle == 7


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="bogus"):
        load_settings(config=str(write(tmp_path / "c.yaml", "bogus: 1\n")))
    with pytest.raises(pydantic.ValidationError):
        load_settings(config=str(write(tmp_path / "d.yaml", "upstream:\n  nope: 1\n")))


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_settings(config=str(write(tmp_path / "c.yaml", "- a\n- b\n")))


def test_empty_yaml_is_fine(tmp_path: Path) -> None:
    assert load_settings(config=str(write(tmp_path / "c.yaml", ""))).port == 8000


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(config=str(tmp_path / "nope.yaml"))


def test_settings_are_typed() -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(port="not a port")  # type: ignore[arg-type]


def test_inherited_environ_is_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPEN_SOMETHING", "x")
    env = inherited_environ()
    assert env["SHARPEN_SOMETHING"] == "x"
    env["SHARPEN_SOMETHING"] = "y"
    assert os.environ["SHARPEN_SOMETHING"] == "x"
