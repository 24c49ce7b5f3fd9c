"""Reading the CPU's features, cores and memory from /proc texts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.backend.cpu import CpuInfo, cpu_list
from tests.server.backend.cpus import MEMINFO_24G, SAPPHIRE_RAPIDS, SKYLAKE, ZEN3, ZEN4, cpu, cpuinfo


@pytest.mark.parametrize(
    ("flags", "isa", "native_bf16"),
    [(SAPPHIRE_RAPIDS, "AMX", True), (ZEN4, "AVX-512", True), (SKYLAKE, "AVX-512", False), (ZEN3, "AVX2", False),
     ("fpu sse sse2", "baseline", False)],
)  # fmt: skip
def test_isa_and_native_bf16(flags: str, isa: str, native_bf16: bool) -> None:
    info = cpu(flags)
    assert info.isa == isa and info.native_bf16 is native_bf16
    assert info.model == "Test CPU" and info.cpus == (0, 1) and info.cores == (0, 1)
    assert round(info.mem_total_gib, 1) == 23.5
    assert info.summary().startswith(f"Test CPU; {isa}; native bf16: ")


def test_hyperthread_siblings_are_not_cores() -> None:
    info = cpu(ZEN3, cpus=8, threads_per_core=2)  # 0-3 are the first threads of cores 0-3, 4-7 their siblings
    assert info.cpus == tuple(range(8)) and info.cores == (0, 1, 2, 3)
    assert "8 CPUs (4 physical cores)" in info.summary()


def test_affinity_limits_the_cpus() -> None:
    info = CpuInfo.parse(cpuinfo(ZEN3, cpus=8, threads_per_core=2), MEMINFO_24G, allowed=[2, 3, 6])
    assert info.cpus == (2, 3, 6) and info.cores == (2, 3)  # 6 is 2's sibling


def test_arm_features_line() -> None:
    text = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd4f\n\nprocessor\t: 1\nFeatures\t: fp\n"
    info = CpuInfo.parse(text)
    assert info.native_bf16 and info.isa == "baseline" and info.cpus == (0, 1) and info.model == "0xd4f"
    assert info.mem_total_gib == 0.0


def test_unreadable_cpuinfo_falls_back_to_the_affinity_mask() -> None:
    info = CpuInfo.parse("", "", allowed=[0, 1, 2])
    assert info.cpus == info.cores == (0, 1, 2) and info.flags == frozenset() and info.model == "unknown CPU"


def test_detect_reads_this_machine(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(cpuinfo(SAPPHIRE_RAPIDS, cpus=64))
    (tmp_path / "meminfo").write_text(MEMINFO_24G)
    info = CpuInfo.detect(tmp_path)
    assert info.cpus == tuple(sorted(os.sched_getaffinity(0))) and info.isa == "AMX"
    real = CpuInfo.detect()
    assert real.cpus and set(real.cores) <= set(real.cpus) and real.mem_total_gib > 0


@pytest.mark.parametrize(
    ("cpus", "text"), [([0, 1], "0-1"), ([3, 0, 1, 2, 5], "0-3,5"), ([7], "7"), ([0, 2, 4], "0,2,4"), ([], "")]
)
def test_cpu_list(cpus: list[int], text: str) -> None:
    assert cpu_list(cpus) == text
