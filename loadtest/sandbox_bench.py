"""Figures for the README's security section: the cost of one sandboxed run, the time from the
wall limit to the whole process tree being gone, and the caller's memory peak under an output
bomb. Runs in this process (the caller plays the server).

    PYTHONPATH=. .venv/bin/python loadtest/sandbox_bench.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from loadtest.machine import cpu_line
from strategies.sandbox import SandboxLimits, run_python

TREE = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print('grandchild', flush=True)
        while True:
            time.sleep(1)
    os._exit(0)
time.sleep(60)
"""
BOMB = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) restarts from the current RSS


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main(runs: int) -> None:
    print(cpu_line())
    await run_python("pass")  # the one-time probe
    start = []
    for _ in range(runs):
        t0 = time.monotonic()
        r = await run_python("print(1)")
        assert r.ok
        start.append(time.monotonic() - t0)
    print(f"trivial run: p50 {1000 * statistics.median(start):.0f} ms, p95 {1000 * _q(start, 0.95):.0f} ms")
    for name, code, limits in (("sleeping process", "import time\ntime.sleep(60)", SandboxLimits(wall_s=1)),
                               ("setsid tree", TREE, SandboxLimits(wall_s=1, allow_fork=True))):
        kill, over = [], []
        for _ in range(runs):
            t0 = time.monotonic()
            r = await run_python(code, limits)
            assert r.timed_out and r.kill_s is not None
            kill.append(r.kill_s)
            over.append(time.monotonic() - t0 - limits.wall_s)
        ms = [1000 * x for x in (statistics.median(kill), _q(kill, 0.95), max(kill), statistics.median(over),
                                 max(over))]
        print(f"{name}: tree gone {ms[0]:.0f} ms (p50) / {ms[1]:.0f} ms (p95) / {ms[2]:.0f} ms (max) after the "
              f"kill; call returned {ms[3]:.0f} ms (p50) / {ms[4]:.0f} ms (max) past the wall limit, {runs} runs")
    grown, took = [], []
    for _ in range(max(3, runs // 4)):
        _reset_peak()
        base = _peak_kib()
        t0 = time.monotonic()
        r = await run_python(BOMB, SandboxLimits(wall_s=15))
        took.append(time.monotonic() - t0)
        assert r.output_exceeded
        grown.append((_peak_kib() - base) / 1024)
    print(f"output bomb: caller peak RSS +{max(grown):.1f} MiB at most, stopped after "
          f"{statistics.median(took):.2f} s (p50), {len(grown)} runs")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    asyncio.run(main(ap.parse_args().runs))
