#!/usr/bin/env python3
"""Build and run the kvq attention kernel test program (tests/native) natively and for aarch64.

The program (tests/native/kvq_kernel_test.cpp) checks the fused kernel against an exact
reference for the scalar tiles and every SIMD tile set the CPU runs; built for aarch64 with
Debian's cross compiler (g++-aarch64-linux-gnu) and run under qemu-aarch64 (qemu-user), it
checks the NEON tiles without an ARM machine. ARM speed is not measured that way.

Steps (each cached under $KVQ_BUILD_CACHE or ~/.cache/kvq-build, in kernel-test/):
  1. stage the patched llama.cpp with scripts/build_runtime.py's functions (pinned sdist, the
     patch series) and keep its ggml/ and include/, restaged only when the series' hash (UPSTREAM
     and the patches; src/ files do not touch ggml) changes;
  2. copy patches/llama.cpp/src and tests/native next to it (only files whose bytes changed, so
     CMake rebuilds only those);
  3. per target, a kept CMake build dir (ggml-base + the program): a warm run rebuilds nothing;
  4. run it (aarch64: qemu-aarch64 -L /usr/aarch64-linux-gnu); its report goes to stdout.

Usage: scripts/kernel_test.py [native] [aarch64]   (default: both). Exit status 1 if any target
fails to build or any check fails. CMAKE_BUILD_PARALLEL_LEVEL sets the build's jobs.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_runtime as br

NATIVE_DIR = br.ROOT / "tests" / "native"
TARGETS = ("native", "aarch64")
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
# Debian packages the aarch64 target needs (scripts/setup.sh installs them)
AARCH64_TOOLS = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "qemu-aarch64": "qemu-user"}


def log(msg: str) -> None:
    print(f"[kernel_test] {msg}", file=sys.stderr, flush=True)


def stage_llama(cache: Path, work: Path) -> Path:
    """The patched llama.cpp's ggml/ and include/ under work/llama.cpp, restaged when the series changes."""
    upstream = br.read_upstream()
    patches = br.patch_series()
    key = br.series_key(upstream, patches, [])
    dest = work / "llama.cpp"
    stamp = work / "llama.cpp.series"
    if stamp.is_file() and stamp.read_text().strip() == key and (dest / "ggml" / "CMakeLists.txt").is_file():
        return dest
    sdist = br.fetch_sdist(cache, upstream)
    log(f"staging llama.cpp {upstream['LLAMA_CPP_COMMIT']} with {len(patches)} patch(es) (series {key})")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".stage-kernel-") as tmp:
        staged = br.stage(sdist, patches, [], Path(tmp), key) / "vendor" / "llama.cpp"
        for part in ("ggml", "include"):
            br.sync_tree(staged / part, dest / part)
    stamp.write_text(key + "\n")
    return dest


def build(target: str, work: Path, llama: Path) -> Path:
    """Configure (once) and build the program for target; returns the executable."""
    bdir = work / f"build-{target}"
    if not (bdir / "CMakeCache.txt").is_file():
        args = ["cmake", "-S", str(work / "native"), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
                f"-DKVQ_LLAMA_DIR={llama}", f"-DKVQ_SRC_DIR={work / 'kvq-src'}"]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        if shutil.which("ccache"):
            args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if target == "aarch64":
            args.append(f"-DCMAKE_TOOLCHAIN_FILE={work / 'native' / 'aarch64-linux-gnu.cmake'}")
        r = subprocess.run(args, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if r.returncode != 0:
            shutil.rmtree(bdir, ignore_errors=True)  # a half-configured dir would be taken as configured
            raise br.BuildError(f"cmake configure for {target} failed")
    r = subprocess.run(["cmake", "--build", str(bdir), "--target", "kvq_kernel_test"],
                       stdout=sys.stderr, stderr=sys.stderr, check=False)
    if r.returncode != 0:
        raise br.BuildError(f"build for {target} failed (build dir {bdir})")
    return bdir / "kvq_kernel_test"


def run(target: str, exe: Path) -> int:
    cmd = [str(exe)] if target == "native" else ["qemu-aarch64", "-L", AARCH64_SYSROOT, str(exe)]
    print(f"== {target} ({platform.machine() if target == 'native' else 'aarch64 under qemu-aarch64'})", flush=True)
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str]) -> int:
    targets = argv or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"kernel_test: unknown target {unknown[0]} (targets: {', '.join(TARGETS)})", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("KVQ_BUILD_CACHE", Path.home() / ".cache" / "kvq-build"))
    work = cache / "kernel-test"
    failed = []
    try:
        if "aarch64" in targets:
            missing = [pkg for tool, pkg in AARCH64_TOOLS.items() if not shutil.which(tool)]
            if missing:
                raise br.BuildError(f"the aarch64 target needs Debian's {' and '.join(missing)}"
                                    f" (apt-get install -y {' '.join(missing)}; scripts/setup.sh installs them)")
        work.mkdir(parents=True, exist_ok=True)
        llama = stage_llama(cache, work)
        br.sync_tree(br.SRC_DIR, work / "kvq-src")
        br.sync_tree(NATIVE_DIR, work / "native")
        for target in targets:
            t0 = time.monotonic()
            exe = build(target, work, llama)
            t1 = time.monotonic()
            rc = run(target, exe)
            log(f"{target}: build {t1 - t0:.1f} s, run {time.monotonic() - t1:.1f} s, exit {rc}")
            if rc != 0:
                failed.append(target)
    except br.BuildError as e:
        print(f"kernel_test: error: {e}", file=sys.stderr)
        return 1
    if failed:
        print(f"kernel_test: failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
