"""The machine readings printed beside benchmark figures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.machine import cpu_line, idle_page_cost


def test_cpu_line_names_the_model_and_only_the_vector_extensions(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx2 fma\n")
    line = cpu_line(info)
    assert line.startswith("AMD EPYC 7B12, ")
    assert line.endswith("flags avx2")


def test_cpu_line_without_cpuinfo(tmp_path: Path) -> None:
    assert cpu_line(tmp_path / "missing") == "unknown CPU"


def test_idle_page_cost_times_the_touch_after_the_sleep_as_cold() -> None:
    # Each repeat: an untimed warm-up touch, a hot touch, the sleep, a cold touch; each touch
    # reads the clock twice. Durations in seconds per touch, in that order.
    durations = iter([9e-3, 1e-4, 4e-3, 9e-3, 3e-4, 8e-3, 9e-3, 2e-4, 6e-3])
    slept: list[float] = []

    def ticks() -> Iterator[float]:
        now = 0.0
        for d in durations:
            yield now
            now += d
            yield now

    clock = ticks()
    hot, cold = idle_page_cost(pages=100, idle_s=0.5, repeats=3, clock=lambda: next(clock), sleep=slept.append)
    assert slept == [0.5, 0.5, 0.5]
    assert hot == pytest.approx(2e-4 * 1e9 / 100)  # the median hot touch, per page
    assert cold == pytest.approx(6e-3 * 1e9 / 100)


def test_idle_page_cost_on_this_machine_is_a_positive_reading() -> None:
    hot, cold = idle_page_cost(pages=64, idle_s=0.0, repeats=1)
    assert 0 < hot < 1e6 and 0 < cold < 1e6
