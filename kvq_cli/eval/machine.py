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


# The tiles of kvq's fused attention kernel, widest first, and the CPU flags each needs (the
# runtime's kvq_isa_best; KVQ_ATTN_ISA=NAME forces one the CPU supports).
_TILES = (
    ("avx512", "AVX-512", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}),
    ("avx2", "AVX2", {"avx2", "fma", "f16c"}),
    ("neon", "NEON", {"asimd"}),
    ("scalar", "scalar", set()),
)


def kvq_tiles(flags: set[str] | None = None) -> str:
    """The tiles kvq's attention runs here, e.g. "AVX-512 + VNNI" (AVX-512 with VNNI and VBMI runs
    q4_0 and kvq2 rows in integers), "AVX2", "NEON" or "scalar"."""
    flags = _cpu_flags() if flags is None else flags
    if platform.machine() in ("aarch64", "arm64"):
        flags = flags | {"asimd"}
    have = [(name, label) for name, label, need in _TILES if need <= flags]
    forced = os.environ.get("KVQ_ATTN_ISA")
    name, label = next(((n, lab) for n, lab in have if n == forced), have[0])
    if name == "avx512" and {"avx512_vnni", "avx512vbmi"} <= flags:
        label += " + VNNI"
    return label


def simd_level() -> str:
    """The widest SIMD the CPU has, and the tiles kvq's attention kernel runs on it, e.g.
    "AVX-512 + AMX, kvq AVX-512 + VNNI tiles"."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        level = "AVX-512" + (" + AMX" if "amx_tile" in flags else "")
    elif "avx2" in flags:
        level = "AVX2"
    elif "asimd" in flags or platform.machine() in ("aarch64", "arm64"):
        level = "NEON"
    else:
        level = "scalar"
    return f"{level}, kvq {kvq_tiles(flags)} tiles"
