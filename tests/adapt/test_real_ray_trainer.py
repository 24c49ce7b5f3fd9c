"""Training as Ray jobs, for real: a local Ray head on loopback (started here, stopped after)
trains a SmolLM2-135M LoRA adapter through ``RayJobTrainer`` for an adaptation cycle run by
sharpen in front of the real vLLM; the adapter is gated, loaded and routed. Also on the real
cluster: a job that fails reports the worker's error, and a cancelled job ends cancelled.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapt.ray_trainer import RayJobTrainer
from adapt.trainer import TrainJob
from tests.adapt.test_real_adaptation import (
    HELDOUT_WORDS,
    KEYS,
    TRAIN_WORDS,
    UNSEEN,
    chat,
    examples,
    question,
    start_run,
    text,
    upstream_models,
    wait_job,
)
from tests.proxy_server import ProxyServer
from tests.ray_head import RayHead
from tests.real_backend import RealVLLM

pytestmark = [
    pytest.mark.real,
    pytest.mark.timeout(900),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("vllm", "peft", "ray")),
                       reason="needs vLLM, peft and the 'ray' extra"),
]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    with RayHead(num_cpus=1) as head:
        yield head


def ray_status(head: RayHead, submission_id: str) -> str:
    r = httpx.get(f"{head.address}/api/jobs/{submission_id}", timeout=10, trust_env=False)
    r.raise_for_status()
    return str(r.json()["status"])


def test_an_adaptation_cycle_trains_on_ray(ray_head: RayHead, real_vllm: RealVLLM,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    data = tmp_path_factory.mktemp("adapt-ray")
    keys = {**KEYS, "kr": "tenant-ray"}
    p = ProxyServer(real_vllm.base_url, data_dir=str(data), admin_key="adm", api_keys=keys,
                    adapt={"enabled": True, "tenants": ["*"], "base_model_path": str(real_vllm.model_path),
                           "max_steps": 10, "learning_rate": 2e-3, "batch_size": 4, "epochs": 10, "gate_margin": 0.1,
                           "threads": 1, "trainer": "ray", "ray_address": ray_head.address,
                           "ray_python": sys.executable},
                    memory={"embedder": "hashing", "distill": False})
    name = f"{real_vllm.served_name}-tenant-ray-v1"
    with p:
        try:
            t0 = time.monotonic()
            # A tenant (so an adapter name) of its own: after test_real_adaptation had served and
            # unloaded "<base>-tenant-a-v1", a new adapter loaded under that same name here made
            # the gate score the base 1.0 too (vLLM's stale state for a reused LoRA name, which
            # sharpen itself avoids by never reusing a name); and a digit of its own.
            body = {"tenant": "tenant-ray", "examples": examples(TRAIN_WORDS, 5), "heldout": examples(HELDOUT_WORDS, 5)}
            job = wait_job(p, start_run(p, body))
            print(f"cycle on Ray: {time.monotonic() - t0:.1f} s")
            assert job["status"] == "succeeded", job
            assert job["train"]["status"] == "done" and job["train"]["step"] == 10, job["train"]
            jdir = data / "adapt" / "jobs" / job["id"]
            sid = (jdir / "ray_job_id").read_text()
            assert ray_status(ray_head, sid) == "SUCCEEDED"  # Ray ran it, not a local child
            assert "adapt.train_worker" in (jdir / "train.log").read_text()  # the Ray job's log
            assert (Path(data / "adapt" / "adapters") / name / "adapter_config.json").is_file()
            a = chat(p, "kr", question(UNSEEN), real_vllm.served_name)
            print("tenant-ray:", repr(text(a)))
            assert a["model"] == name and "-5" in text(a)
        finally:
            if name in upstream_models(real_vllm):  # leave the shared vLLM as we found it
                httpx.post(real_vllm.base_url + "/unload_lora_adapter", json={"lora_name": name}, timeout=30,
                           trust_env=False)


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def write_examples(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": question(f"w{i}")}],
                                        "answer": f"W{i}-7"}) + "\n" for i in range(n)))


async def test_a_failing_job_reports_the_workers_error(ray_head: RayHead, tmp_path: Path) -> None:
    write_examples(tmp_path / "train.jsonl", 4)
    job = TrainJob(job_dir=str(tmp_path / "job"), base_model_path=str(tmp_path / "no-such-model"),
                   examples=str(tmp_path / "train.jsonl"), out_dir=str(tmp_path / "out"), data_hash="x",
                   hyper={"threads": 1, "rank": 8, "alpha": 16, "target_modules": "all-linear"})
    out = await RayJobTrainer(ray_head.address, python=sys.executable).run(job)
    print(out.error)
    assert out.status == "failed" and out.error is not None
    assert "FAILED" in out.error and "no-such-model" in out.error
    assert "--- job log (tail) ---" in out.error


async def test_a_cancelled_ray_job_ends_cancelled(ray_head: RayHead, real_vllm: RealVLLM, tmp_path: Path) -> None:
    write_examples(tmp_path / "train.jsonl", 16)
    job = TrainJob(job_dir=str(tmp_path / "job"), base_model_path=str(real_vllm.model_path),
                   examples=str(tmp_path / "train.jsonl"), out_dir=str(tmp_path / "out"), data_hash="x",
                   hyper={"threads": 1, "rank": 8, "alpha": 16, "target_modules": "all-linear", "learning_rate": 1e-3,
                          "epochs": 100, "max_steps": 1000, "batch_size": 4})
    trainer = RayJobTrainer(ray_head.address, python=sys.executable, grace_s=60)
    run = asyncio.create_task(trainer.run(job))
    deadline = time.monotonic() + 300
    while trainer.progress(job).get("step", 0) < 1:
        assert not run.done(), run.result()
        assert time.monotonic() < deadline, "the Ray job never started training"
        await asyncio.sleep(0.5)
    await trainer.cancel(job)
    out = await asyncio.wait_for(run, 120)
    assert out.status == "cancelled", out
    assert not exists(job.out_dir)
    sid = (Path(job.job_dir) / "ray_job_id").read_text()
    assert ray_status(ray_head, sid) in ("FAILED", "STOPPED")  # the worker exits 2 when it honours cancel
