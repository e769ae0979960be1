"""The fused attention kernel's native test program (tests/native, run by scripts/kernel_test.py).

It checks kvq_fused_partial + kvq_fused_merge against an exact double-precision reference for
every pool type, rotation on and off, GQA groups 1, 3 and 8, batch 1 and 19, threads 1 and 2,
with the scalar tiles and each SIMD tile set the CPU runs: here natively (x86: AVX2, AVX-512, and
on a CPU with AVX-512 VNNI and VBMI the integer path of q4_0 and kvq2 rows, against the reference
with the query rounded as that path rounds it), and cross-built for aarch64 under qemu-aarch64
(NEON), so ARM correctness is checked without an ARM machine. The builds are kept
(~/.cache/kvq-build/kernel-test): once warm, the time is the program's runs, most of it under qemu.
"""
from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "kernel_test.py"


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _expected_isas(target: str) -> set[str]:
    """The tile sets kvq_isa_supported must offer for the target (head_dim 64, groups up to 8)."""
    if target == "aarch64" or platform.machine().lower() in ("aarch64", "arm64"):
        return {"scalar", "neon"}
    flags = _cpu_flags()
    isas = {"scalar"}
    if {"avx2", "fma", "f16c"} <= flags:
        isas.add("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isas.add("avx512")
    return isas


@pytest.mark.parametrize("target", ["native", "aarch64"])
def test_kernel_program_passes(target):
    r = subprocess.run([sys.executable, str(SCRIPT), target], capture_output=True, text=True, timeout=1200,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr[-6000:]
    assert re.search(r"^kvq_kernel_test: ok$", r.stdout, re.MULTILINE), r.stdout
    tested = re.search(r"^isas tested: (.*)$", r.stdout, re.MULTILINE)
    assert tested and set(tested.group(1).split()) == _expected_isas(target), r.stdout
    per_isa = re.findall(r"^isa (\w+)\s*: (\d+) cases, (\d+) failed", r.stdout, re.MULTILINE)
    assert {isa for isa, _, _ in per_isa} == _expected_isas(target), r.stdout
    counts = {int(n) for _, n, _ in per_isa}
    assert len(counts) == 1 and counts.pop() >= 96 and all(f == "0" for _, _, f in per_isa), r.stdout
    # the AVX-512 tiles' integer path (q4_0 and kvq2 rows) runs, and is checked, on CPUs with VNNI and VBMI
    int_path = "avx512" in _expected_isas(target) and {"avx512_vnni", "avx512vbmi"} <= _cpu_flags()
    said = "tested" if int_path else "not on this CPU"
    assert re.search(rf"^integer path \(.*\): {said}$", r.stdout, re.MULTILINE), r.stdout
    if int_path:
        assert re.search(r"^isa avx512\s*: .*; integer path \(q4_0/kvq2 rows; the [1-9]\d* cases", r.stdout,
                         re.MULTILINE), r.stdout

