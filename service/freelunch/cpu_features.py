"""The CPU's name and the instruction-set features our kernels and PyTorch's dispatch on, read
at start-up (no torch import: the API process reports them too, in /metrics and its first log
lines)."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

# /proc/cpuinfo's names, in the order they are reported
FEATURES = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni",
    "amx_bf16", "amx_int8", "asimd", "sve",
)  # fmt: skip


@cache
def _cpuinfo() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def cpu_name() -> str:
    for line in _cpuinfo():
        if line.split(":", 1)[0].strip() in ("model name", "Model", "cpu model"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The FEATURES this CPU has (empty where /proc/cpuinfo is not there)."""
    for line in _cpuinfo():
        if line.split(":", 1)[0].strip() in ("flags", "Features"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in FEATURES if f in flags]
    return []


def isa_level() -> str:
    """The widest x86 level present: amx, avx512_bf16, avx512, avx2, or baseline (ARM: neon/sve)."""
    have = set(cpu_features())
    for level, needs in (
        ("amx", {"amx_bf16"}),
        ("avx512_bf16", {"avx512_bf16"}),
        ("avx512", {"avx512f", "avx512bw", "avx512vl"}),
        ("avx2", {"avx2", "fma"}),
        ("sve", {"sve"}),
        ("neon", {"asimd"}),
    ):
        if needs <= have:
            return level
    return "baseline"
