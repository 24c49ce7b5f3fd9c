"""Training as Ray jobs: the ``Trainer`` interface on a Ray cluster.

``RayJobTrainer`` writes the same ``job.json`` the local trainer writes, submits
``python -m adapt.train_worker <job.json>`` through Ray's job submission API
(``ray.job_submission.JobSubmissionClient``) to ``adapt.ray_address`` (the dashboard's HTTP
address, e.g. ``http://ray-head:8265``), and follows the job: its status from Ray, its progress
from the ``progress.json`` the worker writes. The job folder must therefore be on storage the
cluster's workers see at the same path (``data_dir`` on a shared volume).

Contract, as for the local trainer: ``run`` never raises for the training's own failures. A
cluster that cannot be reached fails the job with the reason; the local trainer is never
substituted. ``cancel`` asks the worker to stop between steps (the ``cancel`` file) and, after a
grace period, stops the Ray job. Ray is an optional extra (``pip install 'sharpen[ray]'``): it
is imported only when a job is submitted, never on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from adapt.trainer import Trainer, TrainJob, TrainOutcome, read_progress, worker_env, write_job_file

log = logging.getLogger(__name__)

ADAPT_PACKAGE = str(Path(__file__).resolve().parent)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class JobClient(Protocol):
    """The part of ``ray.job_submission.JobSubmissionClient`` the trainer uses (all blocking)."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = ..., runtime_env: dict[str, Any] | None = ...,
                   metadata: dict[str, str] | None = ..., entrypoint_num_cpus: float | None = ...) -> str: ...

    def get_job_status(self, job_id: str) -> Any: ...

    def get_job_info(self, job_id: str) -> Any: ...

    def get_job_logs(self, job_id: str) -> str: ...

    def stop_job(self, job_id: str) -> bool: ...


def ray_client(address: str) -> JobClient:
    """Connects to a Ray cluster's job API (raises when it cannot be reached)."""
    from ray.job_submission import JobSubmissionClient

    client: JobClient = JobSubmissionClient(address)
    return client


class RayJobTrainer(Trainer):
    """Runs ``adapt.train_worker`` as a Ray job; one job at a time per job folder."""

    def __init__(self, address: str, *, python: str = "python", runtime_env: dict[str, Any] | None = None,
                 connect_timeout_s: float = 30.0, poll_s: float = 1.0, grace_s: float = 10.0,
                 max_poll_errors: int = 30, logs_tail_chars: int = 2000,
                 client_factory: Callable[[str], JobClient] = ray_client) -> None:
        self.address = address
        self.python = python
        self.runtime_env = runtime_env or {}
        self.connect_timeout_s = connect_timeout_s
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.max_poll_errors = max_poll_errors
        self.logs_tail_chars = logs_tail_chars
        self.client_factory = client_factory
        self._jobs: dict[str, tuple[JobClient, str, asyncio.Event]] = {}

    def entrypoint(self, job_file: Path) -> str:
        return f"{shlex.quote(self.python)} -m adapt.train_worker {shlex.quote(str(job_file))}"

    def job_runtime_env(self, job: TrainJob) -> dict[str, Any]:
        """Ships this server's ``adapt`` package (so the cluster runs the worker that matches it)
        and the thread caps; ``adapt.ray_runtime_env`` adds to it (e.g. ``pip``)."""
        env: dict[str, Any] = {"py_modules": [ADAPT_PACKAGE], **self.runtime_env}
        env["env_vars"] = worker_env(job) | dict(self.runtime_env.get("env_vars", {}))
        return env

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A blocking client call off the event loop, bounded by the connect timeout."""
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that lands as the
        # call returns, and a cancelled run would then go on polling
        async with asyncio.timeout(self.connect_timeout_s):
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def run(self, job: TrainJob) -> TrainOutcome:
        job_file = write_job_file(job)
        try:
            client: JobClient = await self._call(self.client_factory, self.address)
        except Exception as exc:
            return self._failed(job, f"the Ray cluster at {self.address} is unreachable: {_reason(exc)}")
        threads = float(job.hyper.get("threads", 1))
        sid = f"sharpen-{Path(job.job_dir).name}-{uuid.uuid4().hex[:8]}"
        try:
            await self._call(client.submit_job, entrypoint=self.entrypoint(job_file), submission_id=sid,
                             runtime_env=self.job_runtime_env(job), metadata={"sharpen_job_dir": job.job_dir},
                             entrypoint_num_cpus=threads)
        except Exception as exc:
            return self._failed(job, f"the Ray cluster at {self.address} refused the job: {_reason(exc)}")
        (Path(job.job_dir) / "ray_job_id").write_text(sid)
        log.info("training job %s submitted to Ray at %s", sid, self.address)
        finished = asyncio.Event()
        self._jobs[job.job_dir] = (client, sid, finished)
        try:
            status = await self._follow(client, sid)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._call(client.stop_job, sid))
            raise
        finally:
            finished.set()
            self._jobs.pop(job.job_dir, None)
        return await self._outcome(job, client, sid, status)

    async def _follow(self, client: JobClient, sid: str) -> str:
        """Polls Ray until the job ends; returns its final status (or a failure reason)."""
        errors = 0
        while True:
            try:
                status = _status(await self._call(client.get_job_status, sid))
                errors = 0
            except Exception as exc:
                errors += 1
                if errors >= self.max_poll_errors:
                    return f"LOST: the Ray cluster at {self.address} stopped answering: {_reason(exc)}"
                status = ""
            if status in TERMINAL:
                return status
            await asyncio.sleep(self.poll_s)

    async def _outcome(self, job: TrainJob, client: JobClient, sid: str, status: str) -> TrainOutcome:
        logs = ""
        with contextlib.suppress(Exception):
            logs = str(await self._call(client.get_job_logs, sid))
            (Path(job.job_dir) / "train.log").write_text(logs)
        prog = self.progress(job)
        if status == "SUCCEEDED" and prog.get("status") == "done":
            return TrainOutcome(True, "done", adapter_path=job.out_dir, progress=prog)
        if status == "STOPPED" or prog.get("status") == "cancelled":
            return TrainOutcome(False, "cancelled", progress=prog)
        if status.startswith("LOST"):
            return TrainOutcome(False, "failed", error=status.partition(": ")[2], progress=prog)
        reason = prog.get("error")
        if not reason:
            message = ""
            with contextlib.suppress(Exception):
                message = str(getattr(await self._call(client.get_job_info, sid), "message", "") or "")
            reason = message.splitlines()[0] if message else f"the Ray job ended {status}"
        tail = logs[-self.logs_tail_chars:].strip()
        error = f"Ray job {sid} {status}: {reason}" + (f"\n--- job log (tail) ---\n{tail}" if tail else "")
        return TrainOutcome(False, "failed", error=error, progress=prog)

    def _failed(self, job: TrainJob, reason: str) -> TrainOutcome:
        log.warning("training job in %s failed: %s", job.job_dir, reason)
        return TrainOutcome(False, "failed", error=reason, progress=self.progress(job))

    def progress(self, job: TrainJob) -> dict[str, Any]:
        return read_progress(job)

    async def cancel(self, job: TrainJob) -> None:
        (Path(job.job_dir) / "cancel").touch()  # the worker stops between steps and says so
        entry = self._jobs.get(job.job_dir)
        if entry is None:
            return
        client, sid, finished = entry
        try:
            async with asyncio.timeout(self.grace_s):
                await finished.wait()
        except TimeoutError:  # still loading, or stuck: stop the Ray job itself
            with contextlib.suppress(Exception):
                await self._call(client.stop_job, sid)


def _status(value: Any) -> str:
    """Ray's ``JobStatus`` (a str enum) as its plain name."""
    return str(getattr(value, "value", value))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
