"""The Ray trainer's contract against a scripted job client (the real cluster is in
test_real_ray_trainer.py): success, failure with the reason and the log's tail, cancel (graceful
and forced), a cancelled task stops the Ray job, an unreachable or vanishing cluster fails the job
and the local trainer is never substituted."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapt.ray_trainer import ADAPT_PACKAGE, RayJobTrainer, ray_client
from adapt.trainer import TrainJob
from server.settings import AdaptSettings

pytestmark = pytest.mark.timeout(30)


class FakeJobs:
    """Plays a Ray cluster: ``script`` is what the "worker" does once submitted."""

    def __init__(self, script: str = "succeed", *, ticks: int = 2) -> None:
        self.script = script
        self.ticks = ticks
        self.submitted: list[dict[str, Any]] = []
        self.stopped: list[str] = []
        self.polls = 0
        self.status = "PENDING"
        self.job_dir: Path | None = None
        self.lock = threading.Lock()

    def submit_job(self, **kw: Any) -> str:
        self.submitted.append(kw)
        self.job_dir = Path(kw["metadata"]["sharpen_job_dir"])
        return str(kw["submission_id"])

    def _write(self, data: dict[str, Any]) -> None:
        assert self.job_dir is not None
        (self.job_dir / "progress.json").write_text(json.dumps(data))

    def get_job_status(self, job_id: str) -> str:
        with self.lock:  # the trainer polls and stops from different threads
            return self._status()

    def _status(self) -> str:
        self.polls += 1
        assert self.job_dir is not None
        if self.script == "vanish" and self.polls > 1:
            raise ConnectionError("Failed to connect to Ray at address: http://gone:8265.")
        if self.status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return self.status
        if (self.job_dir / "cancel").exists() and self.script != "stuck":
            self._write({"status": "cancelled"})
            self.status = "FAILED"  # the worker exits 2; Ray calls that FAILED
        elif self.polls >= self.ticks and self.script == "succeed":
            self._write({"status": "done", "step": 4, "total_steps": 4, "loss": 0.5})
            self.status = "SUCCEEDED"
        elif self.polls >= self.ticks and self.script == "crash":
            self._write({"status": "failed", "error": "OSError: no such model folder"})
            self.status = "FAILED"
        elif self.polls >= self.ticks and self.script == "setup":
            self.status = "FAILED"  # never started: no progress.json
        else:
            self._write({"status": "training", "step": 1, "total_steps": 4})
            self.status = "RUNNING"
        return self.status

    def get_job_info(self, job_id: str) -> Any:
        class Info:
            message = "runtime_env setup failed: No module named 'peft'\nmore detail"
        return Info()

    def get_job_logs(self, job_id: str) -> str:
        return "loading...\n" * 500 + "Traceback: the last line"

    def stop_job(self, job_id: str) -> bool:
        with self.lock:
            self.stopped.append(job_id)
            self.status = "STOPPED"
        return True


def exists(path: str | Path) -> bool:
    return Path(path).exists()


async def until(pred: Callable[[], bool]) -> None:
    for _ in range(1000):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting")


def make_job(tmp_path: Path, threads: int = 2) -> TrainJob:
    return TrainJob(job_dir=str(tmp_path / "jobs" / "j1"), base_model_path="/models/base",
                    examples=str(tmp_path / "train.jsonl"), out_dir=str(tmp_path / "out"), data_hash="h",
                    hyper={"threads": threads, "rank": 8})


def trainer(jobs: FakeJobs, **kw: Any) -> RayJobTrainer:
    return RayJobTrainer("http://ray-head:8265", poll_s=0.01, client_factory=lambda addr: jobs, **kw)


async def test_success_submits_the_worker_and_reads_its_progress(tmp_path: Path) -> None:
    jobs = FakeJobs("succeed", ticks=3)
    t = trainer(jobs, python="/opt/py/bin/python", runtime_env={"pip": ["peft"], "env_vars": {"HF_HOME": "/h"}})
    job = make_job(tmp_path)
    out = await t.run(job)
    assert out.ok and out.status == "done" and out.adapter_path == job.out_dir, out
    assert out.progress["step"] == 4
    sub = jobs.submitted[0]
    job_file = Path(job.job_dir) / "job.json"
    assert sub["entrypoint"] == f"/opt/py/bin/python -m adapt.train_worker {job_file}"
    assert json.loads(job_file.read_text())["base_model_path"] == "/models/base"
    env = sub["runtime_env"]
    assert env["py_modules"] == [ADAPT_PACKAGE] and env["pip"] == ["peft"]
    assert env["env_vars"]["OMP_NUM_THREADS"] == "2" and env["env_vars"]["HF_HOME"] == "/h"
    assert sub["entrypoint_num_cpus"] == 2.0
    assert (Path(job.job_dir) / "ray_job_id").read_text() == sub["submission_id"]
    assert "Traceback: the last line" in (Path(job.job_dir) / "train.log").read_text()


@pytest.mark.parametrize(("script", "reason"), [("crash", "OSError: no such model folder"),
                                                 ("setup", "runtime_env setup failed: No module named 'peft'")])
async def test_failure_reports_the_reason_and_the_log_tail(tmp_path: Path, script: str, reason: str) -> None:
    out = await trainer(FakeJobs(script), logs_tail_chars=200).run(make_job(tmp_path))
    assert not out.ok and out.status == "failed"
    assert out.error is not None and "FAILED" in out.error and reason in out.error
    assert out.error.endswith("Traceback: the last line") and "more detail" not in out.error
    assert len(out.error) < 400  # the tail, not the whole log


async def test_cancel_lets_the_worker_stop_between_steps(tmp_path: Path) -> None:
    jobs = FakeJobs("succeed", ticks=10_000)
    t, job = trainer(jobs), make_job(tmp_path)
    run = asyncio.create_task(t.run(job))
    await until(lambda: jobs.status == "RUNNING")
    await t.cancel(job)
    out = await run
    assert out.status == "cancelled" and not out.ok and jobs.stopped == []


async def test_cancel_stops_the_ray_job_when_the_worker_does_not(tmp_path: Path) -> None:
    jobs = FakeJobs("stuck", ticks=10_000)
    t, job = trainer(jobs, grace_s=0.2), make_job(tmp_path)
    run = asyncio.create_task(t.run(job))
    await until(lambda: jobs.status == "RUNNING")
    await t.cancel(job)
    out = await run
    assert out.status == "cancelled" and len(jobs.stopped) == 1


async def test_a_cancelled_run_stops_its_ray_job(tmp_path: Path) -> None:
    jobs = FakeJobs("succeed", ticks=10_000)
    run = asyncio.create_task(trainer(jobs).run(make_job(tmp_path)))
    await until(lambda: jobs.status == "RUNNING")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert len(jobs.stopped) == 1


async def test_a_cluster_that_stops_answering_fails_the_job(tmp_path: Path) -> None:
    out = await trainer(FakeJobs("vanish"), max_poll_errors=3).run(make_job(tmp_path))
    assert out.status == "failed" and out.error is not None
    assert "stopped answering" in out.error and "ConnectionError" in out.error


async def test_an_unreachable_cluster_fails_and_nothing_trains_locally(tmp_path: Path) -> None:
    def refuse(address: str) -> Any:
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    job = make_job(tmp_path)
    out = await RayJobTrainer("http://ray-head:8265", client_factory=refuse).run(job)
    assert out.status == "failed" and out.error is not None
    assert "http://ray-head:8265 is unreachable" in out.error and "ConnectionError" in out.error
    assert not exists(Path(job.job_dir) / "progress.json")  # no worker ran here
    assert not exists(job.out_dir)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the 'ray' extra")
async def test_the_real_client_on_a_closed_port_fails_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    job = make_job(tmp_path)
    out = await RayJobTrainer(f"http://127.0.0.1:{port}", client_factory=ray_client).run(job)
    assert out.status == "failed" and out.error is not None
    assert f"http://127.0.0.1:{port} is unreachable" in out.error, out.error
    assert not exists(Path(job.job_dir) / "progress.json")


async def test_a_hanging_cluster_fails_within_the_connect_timeout(tmp_path: Path) -> None:
    def hang(address: str) -> Any:
        import time

        time.sleep(2)
        raise AssertionError("not reached in time")

    out = await RayJobTrainer("http://ray-head:8265", client_factory=hang, connect_timeout_s=0.2).run(
        make_job(tmp_path))
    assert out.status == "failed" and out.error is not None and "no answer in time" in out.error


def test_the_ray_trainer_needs_an_address() -> None:
    with pytest.raises(ValidationError, match="ray_address"):
        AdaptSettings(trainer="ray")
    assert AdaptSettings(trainer="ray", ray_address="http://127.0.0.1:8265").ray_python == "python"
