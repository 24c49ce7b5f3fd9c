"""One primary per data folder: the lock, and what a second sharpen process on the same folder
does (serves as a replica: no memory, no adaptation writes, adapter routes follow the primary)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.ownership import DataDirLock, DataDirOwned, claim
from server.settings import load_settings
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

ADMIN = {"authorization": "Bearer adm"}
KEYS = {"ka": "tenant-a"}


def test_the_lock_is_exclusive_and_says_who_holds_it(tmp_path: Path) -> None:
    a, b = DataDirLock(tmp_path), DataDirLock(tmp_path)
    assert a.acquire()
    assert not b.acquire()
    assert f"pid {os.getpid()}" in b.holder()
    a.release()
    assert b.acquire()
    b.release()


def test_a_crashed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from server.ownership import DataDirLock; "
            "lock = DataDirLock(Path(sys.argv[1])); assert lock.acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert not DataDirLock(tmp_path).acquire()
        assert f"pid {proc.pid}" in DataDirLock(tmp_path).holder()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = DataDirLock(tmp_path)
    assert lock.acquire()  # the kernel dropped the dead process's lock
    lock.release()


def test_claim_roles(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    role, lock, _ = claim(tmp_path, "auto")
    assert role == "primary" and lock is not None
    with caplog.at_level(logging.WARNING, logger="server.ownership"):
        assert claim(tmp_path, "auto")[0] == "replica"
    assert "read-only replica" in caplog.text and f"pid {os.getpid()}" in caplog.text
    with pytest.raises(DataDirOwned, match="role 'replica'"):
        claim(tmp_path, "primary")
    assert claim(tmp_path, "replica")[:2] == ("replica", None)
    lock.release()
    assert claim(tmp_path, "replica")[0] == "replica"  # never takes a free lock either
    role, again, _ = claim(tmp_path, "primary")
    assert role == "primary" and again is not None
    again.release()


def test_a_second_process_on_the_folder_is_a_replica(fake_upstream: FakeUpstream,
                                                     make_proxy: Callable[..., ProxyServer], tmp_path: Path) -> None:
    settings = {"data_dir": str(tmp_path / "data"), "admin_key": "adm", "api_keys": KEYS, "replica_follow_s": 0.1,
                "adapt": {"enabled": True, "tenants": ["*"], "base_model_path": str(tmp_path)}}
    primary = make_proxy(fake_upstream.url, **settings)
    replica = make_proxy(fake_upstream.url, **settings)
    ps, rs = primary.app.services, replica.app.services
    assert (ps.role, rs.role) == ("primary", "replica")
    assert ps.memory is not None and rs.memory is None

    # writes are refused on the replica, with the reason, in the OpenAI error shape
    for method, path, body in [("POST", "/v1/feedback", {"id": "chatcmpl-x", "score": 1}),
                               ("GET", "/admin/memory/stats", None),
                               ("POST", "/admin/adaptation/run", {"tenant": "tenant-a"}),
                               ("POST", "/admin/adapters/rollback", {"tenant": "tenant-a"})]:
        headers = ADMIN if path.startswith("/admin") else {"authorization": "Bearer ka"}
        r = httpx.request(method, replica.root + path, json=body, headers=headers, timeout=10)
        assert r.status_code == 503, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "not_primary" and "read-only replica" in err["message"], err
    assert httpx.get(replica.root + "/admin/adaptation", headers=ADMIN, timeout=10).json()["role"] == "replica"
    assert httpx.get(primary.root + "/admin/memory/stats", headers=ADMIN, timeout=10).status_code == 200

    # the primary promotes an adapter: the replica routes the tenant to it without loading anything
    assert ps.adapt is not None and rs.adapt is not None
    v = ps.adapt.registry.new_version("tenant-a", "fake", tmp_path / "adapters", parent=None, data_hash="h", hyper={})
    httpx.post(fake_upstream.root_url + "/v1/load_lora_adapter", json={"lora_name": v.name, "lora_path": v.path},
               timeout=10).raise_for_status()
    loads = [r for r in fake_upstream.requests if r.path.endswith("load_lora_adapter")]
    ps.adapt.rollout.promote(v)
    deadline = time.monotonic() + 30  # generous: the machine may be busy
    while rs.adapt.registry.active("tenant-a", "fake") != v.name:
        assert time.monotonic() < deadline, "the replica did not follow the promotion"
        time.sleep(0.05)
    r = httpx.post(replica.url + "/chat/completions", headers={"authorization": "Bearer ka"}, timeout=10,
                   json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and fake_upstream.completion_calls()[-1].model == v.name
    assert [r for r in fake_upstream.requests if r.path.endswith("load_lora_adapter")] == loads

    # ...and follows a roll back too
    ps.adapt.registry.deactivate("tenant-a", "fake")
    ps.adapt.registry.update(v.name, status="rolled_back")
    while rs.adapt.registry.active("tenant-a", "fake") is not None:
        assert time.monotonic() < deadline + 10, "the replica did not follow the roll back"
        time.sleep(0.05)

    # the primary stops: its lock goes with it, and the next process on the folder is primary
    primary.stop()
    third = make_proxy(fake_upstream.url, **settings)
    assert third.app.services.role == "primary"


def test_role_primary_refuses_a_held_folder(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    lock = DataDirLock(tmp_path)
    assert lock.acquire()
    try:
        with pytest.raises(DataDirOwned, match="held by another sharpen process"):
            create_app(load_settings(data_dir=str(tmp_path), role="primary", upstream={"url": fake_upstream.url}))
        out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--upstream", fake_upstream.url,
                              "--port", "1", "--role", "primary"],
                             env=os.environ | {"SHARPEN_DATA_DIR": str(tmp_path)}, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and "held by another sharpen process" in out.stderr, out.stderr
    finally:
        lock.release()
