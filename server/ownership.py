"""Who owns a data folder: one primary sharpen process per ``data_dir``, any number of replicas.

sharpen keeps state in ``data_dir``: the experience memory (SQLite plus per-tenant FAISS indexes
that live in the process and are written back to files), the adaptation queue and the adapter
registry (SQLite), training jobs and adapter folders. Two processes writing it would diverge:
each would hold its own FAISS index and overwrite the other's files, both would start training
cycles, reserve the same adapter names, and load and unload adapters behind each other's backs.

So the process holding an exclusive lock on ``data_dir/primary.lock`` is the primary: it owns
every write (memory, queue, registry, training, loading adapters into vLLM). Any other process
on the same folder is a replica: it proxies and runs strategies, follows the primary's adapter
routes (re-reading the registry), and refuses memory and adaptation writes with a clear error.
The lock is ``flock``: the kernel drops it when the holder dies (no stale lock after a crash),
it conflicts between two opens in one process as between processes, and Linux maps it to POSIX
locks on NFS, so it also holds across hosts sharing the folder over NFS.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO, Literal

log = logging.getLogger(__name__)

Role = Literal["primary", "replica"]

NOT_PRIMARY = ("This sharpen process is a read-only replica of {data_dir} (another process holds its lock: "
               "{holder}); memory and adaptation writes go to the primary.")


class DataDirOwned(RuntimeError):
    """``role: primary`` was asked for, but another process holds the data folder."""


class DataDirLock:
    """An exclusive, non-blocking ``flock`` on ``data_dir/primary.lock``, held until ``release``."""

    FILE = "primary.lock"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.FILE
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # held open for as long as the lock is (closing it drops the lock), hence no ``with``;
        # "a+" never truncates: a failed attempt must not erase the holder's note
        f = open(self.path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return True

    def holder(self) -> str:
        """What the holder wrote about itself (pid, host, since)."""
        with contextlib.suppress(OSError):
            return self.path.read_text().strip() or "unknown"
        return "unknown"

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def claim(data_dir: Path, wanted: Literal["auto", "primary", "replica"]) -> tuple[Role, DataDirLock | None, str]:
    """Decides this process's role; returns it, the held lock (primary) and a replica's reason.

    ``auto`` is primary when the lock is free and a replica otherwise; ``primary`` raises
    ``DataDirOwned`` when it is taken; ``replica`` never takes it.
    """
    lock = DataDirLock(data_dir)
    if wanted != "replica":
        if lock.acquire():
            log.info("primary for %s (holds %s)", data_dir, lock.path)
            return "primary", lock, ""
        if wanted == "primary":
            raise DataDirOwned(f"role 'primary' asked for, but {lock.path} is held by another sharpen process "
                               f"({lock.holder()}); stop it, or start this one with role 'replica'")
    if wanted == "replica":
        reason = (f"This sharpen process is a read-only replica of {data_dir} (role 'replica'); memory and "
                  "adaptation writes go to the primary.")
        log.info("replica of %s by configuration", data_dir)
        return "replica", None, reason
    reason = NOT_PRIMARY.format(data_dir=data_dir, holder=lock.holder())
    log.warning("%s Serving as a replica: no memory (recall or writes), no adaptation cycles; adapter routes "
                "follow the primary's registry.", reason)
    return "replica", None, reason
