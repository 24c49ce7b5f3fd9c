"""The training process's loss and compute dtype, on the real SmolLM2 weights (CPU torch)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from adapt.train_worker import compute_dtype, sequence_loss
from server.backend.weights import prepare_model
from server.settings import Settings
from tests.real_backend import REAL_MODEL

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import AutoModelForCausalLM

    path: Path = prepare_model(REAL_MODEL, Settings().cache_dir, python=sys.executable).path
    torch.manual_seed(0)
    m: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return m.eval()


def test_answer_only_logits_give_the_models_own_loss(model: Any) -> None:
    """The loss over the answer tokens from logits kept only there equals the model's own
    ``labels`` loss (logits everywhere, prompt masked), and so does its gradient."""
    ids = [1, 504, 2171, 314, 216, 33, 1041, 28, 253, 1380, 314, 216, 34, 30, 2]
    labels = [-100] * 9 + ids[9:]
    full = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    mine = sequence_loss(torch, model, ids, labels)
    assert abs(full.detach().item() - mine.detach().item()) < 1e-5 and mine.detach().item() > 0
    head = model.get_output_embeddings().weight
    g_full = torch.autograd.grad(full, head)[0]
    g_mine = torch.autograd.grad(sequence_loss(torch, model, ids, labels), head)[0]
    assert float((g_full - g_mine).norm() / g_full.norm()) < 1e-4  # float32 summation order differs


def test_a_sequence_with_nothing_masked_falls_back_to_the_plain_loss(model: Any) -> None:
    ids = [1, 504, 2171, 314, 216, 33]
    full = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert sequence_loss(torch, model, ids, list(ids)).detach().item() == pytest.approx(full.detach().item(), abs=1e-6)


def test_bf16_autocast_stays_close_to_float32(model: Any) -> None:
    ids = [1, 504, 2171, 314, 216, 33, 1041, 28, 253, 1380, 314, 216, 34, 30, 2]
    labels = [-100] * 9 + ids[9:]
    ref = sequence_loss(torch, model, ids, labels).detach().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sequence_loss(torch, model, ids, labels)
    assert low.dtype == torch.float32  # the cross-entropy itself runs on float32 logits
    assert abs(low.detach().item() - ref) < 0.05 * ref


def test_compute_dtype_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compute_dtype(torch, "float32") is torch.float32
    assert compute_dtype(torch, "bfloat16") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert compute_dtype(torch, "auto") is torch.float32  # emulated bf16 is slower: keep float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert compute_dtype(torch, "auto") is torch.bfloat16
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert compute_dtype(torch, "auto") is torch.float32  # a torch without the probes: the safe choice


def test_a_bf16_run_trains_a_float32_adapter(tmp_path: Path) -> None:
    """``dtype: bfloat16`` (what "auto" picks on an AVX-512 BF16 or AMX CPU): the worker process
    trains on the bf16 base and saves the adapter's weights in float32, as vLLM loads them."""
    import json
    import subprocess

    from safetensors.torch import load_file

    path = prepare_model(REAL_MODEL, Settings().cache_dir, python=sys.executable).path
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {k} + 1?"}],
                                            "answer": f"{k} + 1 = {k + 1}. The answer is {k + 1}."}) + "\n"
                                for k in range(3)))
    job = {"job_dir": str(tmp_path), "out_dir": str(tmp_path / "out"), "base_model_path": str(path),
           "examples": str(examples), "data_hash": "x",
           "hyper": {"rank": 4, "alpha": 8, "target_modules": "all-linear", "learning_rate": 1e-3, "epochs": 1,
                     "max_steps": 2, "batch_size": 2, "threads": 1, "dtype": "bfloat16"}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    subprocess.run([sys.executable, "-m", "adapt.train_worker", str(tmp_path / "job.json")], check=True, timeout=300)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["status"] == "done" and progress["dtype"] == "bfloat16" and progress["step"] == 2
    assert progress["loss"] is not None and progress["loss"] > 0
    assert json.loads((tmp_path / "out" / "lineage.json").read_text())["compute_dtype"] == "bfloat16"
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)  # it learned something


def test_a_job_with_a_parent_adapter_continues_it(tmp_path: Path) -> None:
    """``adapt.train_from: current``: the worker starts from the parent's weights, not a fresh
    LoRA. On the parent's own examples the first step's loss is then well below a fresh
    adapter's first step, and the lineage names the parent."""
    import json
    import subprocess

    path = prepare_model(REAL_MODEL, Settings().cache_dir, python=sys.executable).path
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Zorblat {k}?"}],
                                            "answer": f"The zorblat of {k} is {k * 7 + 3}."}) + "\n"
                                for k in range(4)))

    def train(name: str, steps: int, parent: Path | None = None) -> float:
        d = tmp_path / name
        d.mkdir()
        job = {"job_dir": str(d), "out_dir": str(d / "out"), "base_model_path": str(path),
               "examples": str(examples), "data_hash": "x", "parent_adapter": parent and "v1",
               "parent_adapter_path": parent and str(parent),
               "hyper": {"rank": 4, "alpha": 8, "target_modules": "all-linear", "learning_rate": 5e-3,
                         "epochs": 8, "max_steps": steps, "batch_size": 2, "threads": 1, "dtype": "float32",
                         "curriculum": True}}
        (d / "job.json").write_text(json.dumps(job))
        subprocess.run([sys.executable, "-m", "adapt.train_worker", str(d / "job.json")], check=True, timeout=300)
        progress = json.loads((d / "progress.json").read_text())
        assert progress["status"] == "done" and progress["step"] == steps
        return float(progress["loss"])

    fresh_first = train("fresh", 1)
    train("parent", 12)
    continued_first = train("child", 1, parent=tmp_path / "parent" / "out")
    print(f"first-step loss: fresh {fresh_first:.3f}, continuing the parent {continued_first:.3f}")
    assert continued_first < 0.6 * fresh_first
    assert json.loads((tmp_path / "child" / "out" / "lineage.json").read_text())["parent_adapter"] == "v1"
    assert json.loads((tmp_path / "fresh" / "out" / "lineage.json").read_text())["parent_adapter"] is None
