"""The in-process sharpen that ``sharpen eval`` starts: a SIGTERM to the command takes its embedded
vLLM down with it (the child has its own session, so nothing else would), and the results
written so far stay whole.

Heavy: a second vLLM (SmolLM2, ~30 s to start) besides the session's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.backend.process_group import group_members
from tests.real_backend import REAL_MODEL
from tests.server.vllm_children import READY_TIMEOUT, STOP_TIMEOUT, alive, vllm_processes

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]


def test_sigterm_to_eval_takes_the_embedded_vllm_down(tmp_path: Path) -> None:
    dataset = tmp_path / "items.jsonl"
    dataset.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)})
                               + "\n" for i in range(200)))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARPEN_")}
    env.update(SHARPEN_DATA_DIR=str(tmp_path / "data"), SHARPEN_BACKEND__MODEL=REAL_MODEL,
               SHARPEN_BACKEND__KV_CACHE_GIB="1")
    log = tmp_path / "eval.out"
    with log.open("wb") as f:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("sharpen")), "eval", "--dataset", str(dataset),
                                 "--strategies", "passthrough", "--concurrency", "1", "--max-tokens", "32",
                                 "--out", str(out)], stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    results = out / "results.jsonl"
    children: dict[int, int] = {}
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not (results.exists() and results.read_text().count("\n") >= 2):
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            children = children or vllm_processes(parent=proc.pid)
            time.sleep(0.5)
        assert results.exists(), f"no result within {READY_TIMEOUT:.0f} s\n{log.read_text(errors='replace')[-4000:]}"
        children = vllm_processes(parent=proc.pid)
        assert len(children) == 1, "the eval serves through one embedded vLLM"
        (pgid,) = children.values()
        members = group_members(pgid)
        assert len(members) >= 2  # the API server and its engine core at least
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # mid-run: items are still in flight
        code = proc.wait(timeout=STOP_TIMEOUT + 30)
        while time.monotonic() - t0 < STOP_TIMEOUT and any(alive(p) for p in members):
            time.sleep(0.2)
        took = time.monotonic() - t0
        assert not [p for p in members if alive(p)], f"vLLM outlived sharpen eval by {took:.1f} s"
        assert code == 128 + signal.SIGTERM, log.read_text(errors="replace")[-4000:]
        rows = [json.loads(line) for line in results.read_text().splitlines()]  # every line whole
        assert 2 <= len(rows) < 200 and {r["strategy"] for r in rows} == {"passthrough"}
        print(f"sharpen eval: it and vLLM gone {took:.1f} s after SIGTERM, {len(rows)} results kept")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid, group in children.items():  # should a failed test leave one, do not leak it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
