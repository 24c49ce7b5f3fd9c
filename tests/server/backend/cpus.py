"""``/proc/cpuinfo`` texts of CPUs this project meets, for the tuning tests."""

from __future__ import annotations

from server.backend.cpu import CpuInfo

_BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm pni ssse3 fma sse4_1 sse4_2 avx"
# This development machine (Sapphire Rapids class, under KVM).
SAPPHIRE_RAPIDS = (
    f"{_BASE} avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 "
    "amx_tile amx_int8"
)
# AMD EPYC Zen 4: AVX-512 with BF16, no AMX.
ZEN4 = f"{_BASE} avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16"
# AMD EPYC Zen 2/3 (where the slow figures came from): AVX2 only.
ZEN3 = f"{_BASE} avx2 sha_ni"
# Skylake-SP: AVX-512 without BF16.
SKYLAKE = f"{_BASE} avx2 avx512f avx512dq avx512cd avx512bw avx512vl"

MEMINFO_24G = "MemTotal:       24683952 kB\nMemFree:        18000000 kB\n"


def cpuinfo(flags: str, cpus: int = 2, threads_per_core: int = 1, model: str = "Test CPU") -> str:
    """A ``/proc/cpuinfo`` with ``cpus`` processors; siblings of one core are numbered apart, as Linux does."""
    cores = cpus // threads_per_core
    blocks = []
    for cpu in range(cpus):
        blocks.append(
            f"processor\t: {cpu}\nvendor_id\t: Test\nmodel name\t: {model}\nphysical id\t: 0\n"
            f"core id\t\t: {cpu % cores}\nflags\t\t: {flags}\n"
        )
    return "\n".join(blocks) + "\n"


def cpu(flags: str, cpus: int = 2, threads_per_core: int = 1, meminfo: str = MEMINFO_24G) -> CpuInfo:
    return CpuInfo.parse(cpuinfo(flags, cpus, threads_per_core), meminfo)
