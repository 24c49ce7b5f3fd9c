"""Experience replay end to end with the real vLLM (SmolLM2-135M) and the real MiniLM embedder:
a repeated task family the model cannot know gets better with memory on than off.

The family is a made-up convention ("the zorblat code of X is ZB-X"): without memory the model
invents something; with recall on, the experiences of other members of the family (seeded
through the admin import, then grown through /v1/feedback on correct answers) are injected
and the model copies the convention. Both are measured on the same held-out members.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.proxy_server import ProxyServer
from tests.real_backend import RealVLLM

pytestmark = [
    pytest.mark.real,
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]

ADMIN = {"authorization": "Bearer adm"}
USER = {"authorization": "Bearer k"}
SEEDS = ["apple", "river"]
TRAIN = ["candle", "falcon", "mirror"]
HELD_OUT = ["tiger", "lemon", "castle", "violin", "rocket", "garden", "pepper", "button"]


def question(x: str) -> str:
    return f"What is the zorblat code of {x}?"


def correct(x: str, text: str) -> bool:
    return f"zb-{x}" in text.lower().replace(" ", "")


def test_memory_improves_a_repeated_task_family(real_vllm: RealVLLM, make_proxy: Callable[..., ProxyServer],
                                                 tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = make_proxy(real_vllm.base_url, data_dir=str(tmp_path), admin_key="adm", api_keys={"k": "tenant"},
                   memory={"embedder": "minilm", "distill": False, "persist_interval_s": 0.5})
    deadline = time.monotonic() + 120
    while not httpx.get(p.root + "/admin/memory/stats", headers=ADMIN, timeout=30).json().get("ready"):
        assert time.monotonic() < deadline, "memory did not become ready"
        time.sleep(0.2)

    def ask(x: str, recall: bool) -> dict[str, Any]:
        r = httpx.post(p.url + "/chat/completions", headers=USER, timeout=180, json={
            "model": real_vllm.served_name, "messages": [{"role": "user", "content": question(x)}],
            "max_tokens": 24, "temperature": 0, "memory": {"recall": recall, "remember": False}})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    # Seed the convention with two experiences.
    body = b"".join(orjson.dumps({"tenant": "tenant", "task": question(x), "score": 1.0,
                                  "answer": f"The zorblat code of {x} is ZB-{x}."}) + b"\n" for x in SEEDS)
    r = httpx.post(p.root + "/admin/memory/import", headers=ADMIN, content=body, timeout=60)
    assert r.status_code == 200 and r.json()["imported"] == len(SEEDS)

    # Grow the memory from use: answers judged correct are fed back with a high score.
    with concurrent.futures.ThreadPoolExecutor(len(HELD_OUT) * 2) as pool:
        trained = list(pool.map(lambda x: (x, ask(x, True)), TRAIN))
    fed = 0
    for x, resp in trained:
        assert resp["sharpen"]["memory"], "the seeds should be recalled for a member of the family"
        if correct(x, resp["choices"][0]["message"]["content"]):
            r = httpx.post(p.url + "/feedback", headers=USER, json={"id": resp["id"], "score": 1.0}, timeout=30)
            assert r.status_code == 200 and r.json()["kind"] == "success"
            fed += 1
    stats = httpx.get(p.root + "/admin/memory/stats", headers=ADMIN, timeout=30).json()
    assert stats["tenants"]["tenant"] == len(SEEDS) + fed and stats["embedder"] == "all-MiniLM-L6-v2"

    # Held-out members, the same items with recall on and off (greedy decoding).
    with concurrent.futures.ThreadPoolExecutor(len(HELD_OUT) * 2) as pool:
        on = list(pool.map(lambda x: ask(x, True), HELD_OUT))
        off = list(pool.map(lambda x: ask(x, False), HELD_OUT))
    texts_on = [r["choices"][0]["message"]["content"] for r in on]
    texts_off = [r["choices"][0]["message"]["content"] for r in off]
    acc_on = sum(correct(x, t) for x, t in zip(HELD_OUT, texts_on, strict=True)) / len(HELD_OUT)
    acc_off = sum(correct(x, t) for x, t in zip(HELD_OUT, texts_off, strict=True)) / len(HELD_OUT)
    report = "\n".join(f"{x}: on={a!r} off={b!r}" for x, a, b in zip(HELD_OUT, texts_on, texts_off, strict=True))
    print(f"accuracy with memory {acc_on:.2f}, without {acc_off:.2f} (fed back {fed}/{len(TRAIN)}, "
          f"{time.monotonic() - t0:.0f} s)\n{report}")
    assert all(r["sharpen"]["memory"] for r in on)
    assert all("sharpen" not in r for r in off)
    assert acc_on > acc_off, report
    assert acc_on >= 0.5, report
