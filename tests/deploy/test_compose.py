"""deploy/docker-compose.yml holds together: Compose accepts it (when a compose tool is here),
sharpen's environment is valid settings that point at the services the file defines, and every
container that meets a path by name (jobs, adapters, the base model) mounts it at that path."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves the x-vllm anchor
    return data


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (volume name or host path)."""
    out = {}
    for v in service.get("volumes", []):
        spec = v.removesuffix(":ro").removesuffix(":rw")
        source, target = spec.rsplit(":", 1)  # the source may hold ':' (${VAR:?message})
        out[target] = source
    return out


def flag(command: str, name: str) -> str:
    args = shlex.split(command)
    return args[args.index(name) + 1]


def compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(compose_tool() is None, reason="no docker compose here (the structure tests below still run)")
def test_compose_accepts_the_file() -> None:
    tool = compose_tool()
    assert tool is not None
    out = subprocess.run([*tool, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin:/usr/local/bin", "SHARPEN_MODEL_DIR": "/tmp"}, timeout=60)
    assert out.returncode == 0, out.stderr
    missing = subprocess.run([*tool, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin:/usr/local/bin"}, timeout=60)
    assert missing.returncode != 0 and "SHARPEN_MODEL_DIR" in missing.stderr  # refuses to start without weights


def test_two_vllm_replicas_of_one_model_with_runtime_lora(compose: dict[str, Any]) -> None:
    services = compose["services"]
    vllms = {name: s for name, s in services.items() if "vllm" in str(s.get("image", ""))}
    assert sorted(vllms) == ["vllm-a", "vllm-b"]
    a, b = vllms["vllm-a"], vllms["vllm-b"]
    assert a["command"] == b["command"] and "--enable-lora" in a["command"]
    assert flag(a["command"], "--model") == "/models/base"
    for s in (a, b):
        assert s["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert mounts(s)["/data"] == "sharpen-data"  # vLLM reads adapters by the path sharpen gives it
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in (a, b)]
    assert gpus[0] != gpus[1]


def test_sharpen_settings_point_at_the_services(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    env = services["sharpen"]["environment"]
    for k in list(__import__("os").environ):
        if k.startswith("SHARPEN_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    s = Settings()  # the environment as sharpen reads it: unknown or malformed keys fail here
    assert s.role == "primary" and s.admin_key and s.api_keys
    hosts = [urlparse(u) for u in s.upstream.endpoints]
    assert sorted(h.hostname or "" for h in hosts) == ["vllm-a", "vllm-b"]
    assert all(h.port == 8000 and h.path == "/v1" for h in hosts)

    assert s.adapt.enabled and s.adapt.trainer == "ray"
    ray = urlparse(s.adapt.ray_address or "")
    head = services["ray-head"]
    assert ray.hostname == "ray-head" and str(ray.port) == flag(head["command"], "--dashboard-port")
    assert flag(head["command"], "--dashboard-host") == "0.0.0.0"  # reachable from the sharpen container
    assert "ray-head" in services["sharpen"]["depends_on"]
    assert services["sharpen"]["build"]["args"]["EXTRAS"] == "[ray]"

    # the trainer reads the base model and writes jobs and adapters where sharpen and vLLM look
    data = str(s.data_dir)
    assert mounts(services["sharpen"])[data] == mounts(head)[data] == "sharpen-data"
    base = s.adapt.base_model_path or ""
    assert base in mounts(head) and mounts(head)[base] == mounts(services["vllm-a"])[base]


def test_the_images_install_what_the_services_run() -> None:
    sharpen = (ROOT / "Dockerfile").read_text()
    assert "ARG EXTRAS" in sharpen and '".${EXTRAS}"' in sharpen
    ray = (ROOT / "deploy" / "ray.Dockerfile").read_text()
    assert "rayproject/ray:2.60.0" in ray and "peft" in ray and "transformers" in ray
