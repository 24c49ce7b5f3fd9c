"""The Docker image starts: exactly the folders the Dockerfile copies, installed as its
``pip install .`` does into a fresh venv, serve one request in front of the fake upstream.

Docker itself is not needed: the venv sees the shared venv's third-party packages (a path
line in a .pth file, so the shared venv's editable install of sharpen is NOT active there);
sharpen itself comes only from the copied folders.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def copied(dockerfile: Path) -> list[str]:
    """The sources of every ``COPY`` line (flags and the destination dropped)."""
    out: list[str] = []
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        if not line.strip().upper().startswith("COPY "):
            continue
        words = shlex.split(line)
        if words[0].upper() == "COPY":
            args = [w for w in words[1:] if not w.startswith("--")]
            out.extend(args[:-1])
    return out


def test_copy_lines_are_parsed() -> None:
    assert copied(ROOT / "Dockerfile")[:2] == ["pyproject.toml", "README.md"]


def test_the_image_contents_serve_a_request(tmp_path: Path) -> None:
    src = tmp_path / "app"
    src.mkdir()
    for name in copied(ROOT / "Dockerfile"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "shared-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SHARPEN_")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--ignore-installed", "--no-index", str(src)],
                   check=True, env=env, cwd=tmp_path)
    where = subprocess.run([str(python), "-c", "import server; print(server.__file__)"],
                           check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not a checkout
    port = free_port()
    env |= {"SHARPEN_DATA_DIR": str(tmp_path / "data"), "SHARPEN_MEMORY__ENABLED": "false"}
    with FakeUpstream() as fake:
        proc = subprocess.Popen([str(venv / "bin" / "sharpen"), "serve", "--upstream", fake.url, "--port", str(port)],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=20,
                           json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
        finally:
            proc.terminate()
            proc.wait(timeout=20)
