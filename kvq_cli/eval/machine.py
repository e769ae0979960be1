"""The machine a measurement ran on: every committed speed or memory figure names its CPU."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    """CPU model and core count, e.g. "AMD EPYC 7B13, 2 cores"."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def simd_level() -> str:
    """The widest SIMD the CPU has, and the tiles kvq's attention kernel runs on it (chosen at run time:
    AVX2 with FMA and F16C, else scalar; KVQ_ATTN_SIMD=0 forces scalar), e.g. "AVX-512, kvq AVX2 tiles"."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        level = "AVX-512" + (" + AMX" if "amx_tile" in flags else "")
    elif "avx2" in flags:
        level = "AVX2"
    elif "asimd" in flags or platform.machine() in ("aarch64", "arm64"):
        level = "NEON"
    else:
        level = "scalar"
    avx2_tiles = {"avx2", "fma", "f16c"} <= flags and os.environ.get("KVQ_ATTN_SIMD", "1") != "0"
    return f"{level}, kvq {'AVX2' if avx2_tiles else 'scalar'} tiles"
