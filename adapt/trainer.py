"""The trainer interface, and the local-process implementation.

A trainer takes a ``TrainJob`` (base weights, examples, hyperparameters, output folder) and runs
it somewhere else than the server's event loop. ``LocalProcessTrainer`` runs
``python -m adapt.train_worker`` as a child process with its thread count capped;
``adapt.ray_trainer.RayJobTrainer`` submits the same job JSON as a Ray job and reads the same
``progress.json`` from shared storage.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainJob:
    """Everything a training run needs; serialised to ``job_dir/job.json``."""

    job_dir: str
    base_model_path: str
    examples: str  # JSONL: {"messages": [...], "answer": "..."}
    out_dir: str
    data_hash: str
    hyper: dict[str, Any] = field(default_factory=dict)
    parent_adapter: str | None = None
    parent_adapter_path: str | None = None


@dataclass
class TrainOutcome:
    ok: bool
    status: str  # done | failed | cancelled
    adapter_path: str | None = None
    error: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)


class Trainer(abc.ABC):
    """Runs one job at a time; ``progress`` may be polled while ``run`` is awaited."""

    @abc.abstractmethod
    async def run(self, job: TrainJob) -> TrainOutcome:
        """Trains; returns the outcome (never raises for the training's own failures)."""

    @abc.abstractmethod
    def progress(self, job: TrainJob) -> dict[str, Any]:
        """The latest progress the job reported (status, step, total_steps, loss, checkpoint)."""

    @abc.abstractmethod
    async def cancel(self, job: TrainJob) -> None:
        """Asks the job to stop; ``run`` then returns a cancelled outcome."""


def write_job_file(job: TrainJob) -> Path:
    """Writes ``job_dir/job.json`` (what ``adapt.train_worker`` reads); returns its path."""
    d = Path(job.job_dir)
    d.mkdir(parents=True, exist_ok=True)
    job_file = d / "job.json"
    job_file.write_text(json.dumps(asdict(job)))
    return job_file


def worker_env(job: TrainJob) -> dict[str, str]:
    """The variables the worker needs on top of its environment: thread caps, offline hubs."""
    threads = str(job.hyper.get("threads", 1))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def read_progress(job: TrainJob) -> dict[str, Any]:
    """The worker's latest ``progress.json`` (empty before it wrote one)."""
    try:
        data = json.loads((Path(job.job_dir) / "progress.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class LocalProcessTrainer(Trainer):
    """Trains in a child process on this machine (CPU here, the GPU where there is one)."""

    def __init__(self, *, environ: Mapping[str, str] | None = None, python: str = sys.executable,
                 grace_s: float = 10.0) -> None:
        self.environ = dict(environ or {})  # the server's environment (settings read it), which the child extends
        self.python = python
        self.grace_s = grace_s
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    def command(self, job_file: Path) -> list[str]:
        return [self.python, "-m", "adapt.train_worker", str(job_file)]

    def _prepare(self, job: TrainJob) -> tuple[Path, dict[str, str], Any]:
        """Writes the job file; returns it, the child's environment and its open log file."""
        job_file = write_job_file(job)
        env = self.environ | worker_env(job)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return job_file, env, open(Path(job.job_dir) / "train.log", "ab")

    async def run(self, job: TrainJob) -> TrainOutcome:
        job_file, env, log = self._prepare(job)
        with log:
            proc = await asyncio.create_subprocess_exec(*self.command(job_file), stdout=log, stderr=log, env=env,
                                                        start_new_session=True)
        self._procs[job.job_dir] = proc
        try:
            code = await proc.wait()
        except asyncio.CancelledError:
            await self._kill(proc)
            raise
        finally:
            self._procs.pop(job.job_dir, None)
        prog = self.progress(job)
        if code == 0 and prog.get("status") == "done":
            return TrainOutcome(True, "done", adapter_path=job.out_dir, progress=prog)
        if code == 2:
            return TrainOutcome(False, "cancelled", progress=prog)
        err = prog.get("error") or f"the trainer exited with status {code}"
        return TrainOutcome(False, "failed", error=str(err), progress=prog)

    def progress(self, job: TrainJob) -> dict[str, Any]:
        return read_progress(job)

    async def cancel(self, job: TrainJob) -> None:
        (Path(job.job_dir) / "cancel").touch()
        proc = self._procs.get(job.job_dir)
        if proc is not None:
            try:
                async with asyncio.timeout(self.grace_s):
                    await proc.wait()
            except TimeoutError:
                await self._kill(proc)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
