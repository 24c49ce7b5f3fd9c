"""The backend's choices for a CPU: dtype, LoRA slots, KV cache, thread binding, and their reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.backend.catalog import PreparedModel
from server.backend.tuning import plan_backend
from server.settings import BackendSettings, Settings
from tests.server.backend.cpus import SAPPHIRE_RAPIDS, SKYLAKE, ZEN3, ZEN4, cpu

# Qwen2.5-0.5B's shape: 24 layers, 2 KV heads of 896 / 14 = 64 dimensions.
QWEN_05B = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896}


def model_dir(tmp_path: Path, config: dict[str, Any]) -> PreparedModel:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return PreparedModel(tmp_path, "m")


@pytest.mark.parametrize(("flags", "dtype"), [(SAPPHIRE_RAPIDS, "bfloat16"), (ZEN4, "bfloat16"),
                                              (SKYLAKE, "float32"), (ZEN3, "float32")])  # fmt: skip
def test_dtype_follows_native_bf16(flags: str, dtype: str) -> None:
    plan = plan_backend(BackendSettings(), cpu(flags))
    assert plan.dtype == dtype and plan.args()[:2] == ["--dtype", dtype]
    why = plan.reasons[1]
    assert why.startswith(f"dtype {dtype} (auto)")
    assert ("natively" in why) if dtype == "bfloat16" else ("emulated" in why)


def test_dtype_override() -> None:
    plan = plan_backend(BackendSettings(dtype="bfloat16"), cpu(ZEN3))
    assert plan.dtype == "bfloat16" and plan.reasons[1] == "dtype bfloat16: set in backend.dtype"
    assert plan_backend(BackendSettings(dtype="float32"), cpu(SAPPHIRE_RAPIDS)).dtype == "float32"


def test_lora_slots_follow_adaptation_through_settings() -> None:
    off = Settings().backend  # adapt is off by default
    assert not off.expect_adapters
    plan = plan_backend(off, cpu(SAPPHIRE_RAPIDS))
    assert not plan.lora and "--enable-lora" not in plan.args()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plan.environ() and "no adapters expected" in plan.reasons[2]

    on = Settings(adapt={"enabled": True, "rank": 16}).backend
    assert on.expect_adapters and on.max_lora_rank == 16
    plan = plan_backend(on, cpu(SAPPHIRE_RAPIDS))
    assert plan.args() == ["--dtype", "bfloat16", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
                           "--no-enable-chunked-prefill"]
    assert plan.environ()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert plan.reasons[2] == "LoRA on (auto): adapters expected, 2 slots of rank <= 16 (the trained rank)"

    # The backend section wins over adaptation.
    pinned = Settings(adapt={"enabled": True, "rank": 16}, backend={"lora": "off", "max_lora_rank": 4}).backend
    assert pinned.max_lora_rank == 4 and not plan_backend(pinned, cpu(ZEN3)).lora
    forced = Settings(backend={"lora": "on"}).backend
    assert plan_backend(forced, cpu(ZEN3)).reasons[2] == "LoRA on (2 slots of rank <= 8): set in backend.lora"


def test_lora_with_forced_emulated_bf16_says_so() -> None:
    plan = plan_backend(BackendSettings(dtype="bfloat16"), cpu(ZEN3))
    assert plan.lora and "emulated" in plan.reasons[2]
    assert "emulated" not in plan_backend(BackendSettings(), cpu(ZEN3)).reasons[2]  # float32 there


def test_kv_cache_is_sized_from_the_model(tmp_path: Path) -> None:
    model = model_dir(tmp_path, QWEN_05B)
    plan = plan_backend(BackendSettings(), cpu(SAPPHIRE_RAPIDS), model)
    # 2 x 24 x 2 x 64 x 2 bytes = 12 KiB/token; x 2048 x 16 = 384 MiB -> 1 GiB (whole GiB only).
    assert plan.kv_cache_gib == 1 and plan.environ()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "12 KiB/token in bfloat16 x 2048 tokens x 16 sequences" in plan.reasons[3]
    long = plan_backend(BackendSettings(max_model_len=32768, dtype="float32"), cpu(ZEN3), model)
    assert long.kv_cache_gib == 5  # 24 KiB x 32768 x 16 = 12 GiB, capped at a quarter of 23.5 GiB
    assert "capped at a quarter" in long.reasons[3]


def test_kv_cache_fallbacks_and_override(tmp_path: Path) -> None:
    hub = PreparedModel(Path("org/m"), "org/m", hub_id="org/m")
    assert plan_backend(BackendSettings(), cpu(ZEN3), hub).kv_cache_gib == 2
    assert plan_backend(BackendSettings(), cpu(ZEN3), model_dir(tmp_path, {"bad": 1})).kv_cache_gib == 2
    plan = plan_backend(BackendSettings(kv_cache_gib=0.4), cpu(ZEN3), hub)
    assert plan.kv_cache_gib == 1 and plan.reasons[3] == "KV cache 1 GiB: set in backend.kv_cache_gib"


def test_threads_one_per_core_and_reserve_on_larger_machines() -> None:
    small = plan_backend(BackendSettings(), cpu(ZEN3))
    assert small.threads_bind == "0-1" and small.reserved_cpus == 0
    assert small.environ()["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert "none reserved on 2 cores" in small.reasons[5]
    big = plan_backend(BackendSettings(), cpu(ZEN3, cpus=16, threads_per_core=2))
    assert big.threads_bind == "0-6" and big.reserved_cpus == 1
    assert big.environ()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert "8 hyperthread siblings left idle" in big.reasons[5] and "one of 8 cores" in big.reasons[5]


def test_chunked_prefill_off_unless_asked_for() -> None:
    """vLLM-cpu 0.32's engine dies on a seeded request whose prefill is split: off by default."""
    plan = plan_backend(BackendSettings(), cpu(ZEN4))
    assert not plan.chunked_prefill and plan.args()[-1] == "--no-enable-chunked-prefill"
    assert plan.reasons[4].startswith("chunked prefill off (auto): vLLM-cpu's engine dies")
    on = plan_backend(BackendSettings(chunked_prefill="on"), cpu(ZEN4))
    assert on.args()[-1] == "--enable-chunked-prefill"
    assert on.reasons[4] == "chunked prefill on: set in backend.chunked_prefill"


def test_thread_overrides() -> None:
    plan = plan_backend(BackendSettings(omp_threads_bind="0", reserved_cpus=1), cpu(ZEN3))
    assert plan.threads_bind == "0" and plan.reserved_cpus == 1
    assert plan.reasons[5] == "threads bound to 0: set in backend.omp_threads_bind"
    none = plan_backend(BackendSettings(reserved_cpus=0), cpu(ZEN3, cpus=16, threads_per_core=2))
    assert none.threads_bind == "0-7" and none.reserved_cpus == 0
    one_core = plan_backend(BackendSettings(reserved_cpus=3), cpu(ZEN3, cpus=1))
    assert one_core.threads_bind == "0" and one_core.reserved_cpus == 0  # never reserve every core


def test_reasons_start_with_the_cpu() -> None:
    plan = plan_backend(BackendSettings(), cpu(ZEN4))
    assert plan.reasons[0] == "CPU: Test CPU; AVX-512; native bf16: avx512_bf16; 2 CPUs (2 physical cores); 24 GiB"
    assert len(plan.reasons) == 6
