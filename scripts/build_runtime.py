#!/usr/bin/env python3
"""Build the kvq llama.cpp runtime wheel: pinned llama-cpp-python sdist + our patch series
+ our new llama.cpp sources.

Inputs (patches/llama.cpp/): UPSTREAM (pins), 000N-*.patch (changes to upstream files: the
ggml kvq2 type, the hooks), src/** (new files, e.g. llama-kvq*.cpp/.h, edited as plain files).

Steps (each cached, so a source change rebuilds in seconds):
  1. download the pinned sdist with pip and check its sha256 (patches/llama.cpp/UPSTREAM);
  2. extract it to a staging dir, apply patches/llama.cpp/000N-*.patch in order, then copy
     patches/llama.cpp/src/** into vendor/llama.cpp/src/ (an error if that would overwrite a
     file the sdist or a patch already has: upstream files change through patches only);
  3. sync staging into a *stable* source dir, copying only files whose bytes changed, so
     mtimes of untouched files survive and CMake rebuilds only what changed;
  4. build a wheel with a kept scikit-build-core build dir and ccache: libllama for Python and, from the
     same tree and build dir, llama.cpp's tools (TOOLS: llama-server, ...), installed next to
     libllama in llama_cpp/lib with rpath $ORIGIN (0004-build-tools.patch), so they run on the
     very libraries Python loads; scripts/setup.sh links them into .venv/bin;
  5. keep the wheel under wheels/<series-hash>/ and print its path (the only stdout line).

The series hash covers the recipe, UPSTREAM, every patch and every src/ file (path + bytes).
The wheel version gets a local label (0.3.36+kvq.<hash>) so pip reinstalls it when the
series changes. Cache root: $KVQ_BUILD_CACHE or ~/.cache/kvq-build (outside the repo, so a
fresh clone on the same machine reuses it).
"""
from __future__ import annotations

import filecmp
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "patches" / "llama.cpp"
SRC_DIR = PATCH_DIR / "src"             # new files, copied to vendor/llama.cpp/src/
SRC_DEST = Path("vendor") / "llama.cpp" / "src"
# Bump when the build recipe itself changes in a way that changes the wheel.
RECIPE = "3"
# llama.cpp's tools built into the wheel (kvq_cli/runtime/tools.py names the same ones). They are the only
# build targets: libllama, libggml*, libllama-common and libmtmd (which llama-server links) come as their
# dependencies, and none of the other tools that llama.cpp's tools/ adds is compiled.
TOOLS = ("llama-server", "llama-perplexity", "llama-bench", "llama-cli")
CMAKE_ARGS = [
    "-DLLAVA_BUILD=OFF",                # tools/ adds mtmd itself; LLAVA_BUILD would add it a second time
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",             # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",      # ... and no download of it: llama-server serves the API only
    "-DLLAMA_OPENSSL=OFF",              # plain-HTTP server on localhost; no libssl at build or run time
    f"-DLLAMA_CPP_PYTHON_TOOLS={';'.join(TOOLS)}",
    "-DGGML_NATIVE=ON",
    "-DCMAKE_BUILD_TYPE=Release",
]
# -march=native turns on ggml's AMX matmul on CPUs that report AMX; on this workplace's AMX
# machines it segfaults in ggml_backend_amx_mul_mat (stock llama.cpp too), so AMX is left out
# (an explicit -mno-* wins over -march). Passed as -C cmake.define.* since they hold spaces.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_DEFINES = ({"CMAKE_C_FLAGS": NO_AMX, "CMAKE_CXX_FLAGS": NO_AMX}
                 if platform.machine().lower() in ("x86_64", "amd64") else {})


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[build_runtime] {msg}", file=sys.stderr, flush=True)


def read_upstream() -> dict[str, str]:
    path = PATCH_DIR / "UPSTREAM"
    if not path.is_file():
        raise BuildError(f"missing {path}")
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    for key in ("LLAMA_CPP_PYTHON_VERSION", "LLAMA_CPP_COMMIT", "SDIST_SHA256"):
        if key not in out:
            raise BuildError(f"{path}: missing {key}")
    return out


def patch_series() -> list[Path]:
    patches = sorted(PATCH_DIR.glob("*.patch"))
    for p in patches:
        stem = p.name.split("-", 1)[0]
        if not (len(stem) == 4 and stem.isdigit()):
            raise BuildError(f"unknown patch {p.name}: series files are named 000N-short-name.patch")
    return patches


def source_files() -> list[tuple[str, Path]]:
    """patches/llama.cpp/src/**: (path relative to src/, posix; file), sorted by path."""
    if not SRC_DIR.is_dir():
        return []
    return sorted((p.relative_to(SRC_DIR).as_posix(), p) for p in SRC_DIR.rglob("*") if p.is_file())


def series_key(upstream: dict[str, str], patches: list[Path], sources: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    h.update(f"recipe={RECIPE}\n".encode())
    h.update(" ".join(CMAKE_ARGS).encode())
    h.update(repr(sorted(CMAKE_DEFINES.items())).encode())
    for k in sorted(upstream):
        h.update(f"{k}={upstream[k]}\n".encode())
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for rel, p in sources:
        h.update(b"src/" + rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(cache: Path, upstream: dict[str, str]) -> Path:
    version = upstream["LLAMA_CPP_PYTHON_VERSION"]
    sdist_dir = cache / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        log(f"downloading llama-cpp-python=={version} sdist")
        sdist_dir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            # pip prepares the sdist's metadata in an isolated env (it fetches scikit-build-core),
            # so a fresh venv needs nothing preinstalled
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(sdist_dir)],
            stdout=sys.stderr, stderr=sys.stderr,
        )
        if r.returncode != 0 or not sdist.is_file():
            raise BuildError(f"could not download llama-cpp-python=={version} sdist")
    got = sha256_file(sdist)
    if got != upstream["SDIST_SHA256"]:
        sdist.unlink()
        raise BuildError(f"sdist sha256 mismatch: got {got}, UPSTREAM pins {upstream['SDIST_SHA256']}")
    return sdist


def stage(sdist: Path, patches: list[Path], sources: list[tuple[str, Path]], work: Path, version_label: str) -> Path:
    with tarfile.open(sdist) as tf:
        tf.extractall(work, filter="data")
    (src,) = [p for p in work.iterdir() if p.is_dir()]
    for p in patches:
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "--silent", "-i", str(p)],
                           cwd=src, capture_output=True, text=True)
        if r.returncode != 0:
            detail = (r.stdout + r.stderr).strip().splitlines()
            raise BuildError(f"patch {p.name} does not apply: {detail[0] if detail else 'patch failed'}")
    for rel, p in sources:
        dest = src / SRC_DEST / rel
        if dest.exists() or dest.is_symlink():
            raise BuildError(f"patches/llama.cpp/src/{rel} would overwrite {SRC_DEST.as_posix()}/{rel}, which the sdist"
                             " or a patch already has: rename the new file, or change that file with a patch")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    init = src / "llama_cpp" / "__init__.py"
    text = init.read_text()
    base = text.split('__version__ = "', 1)[1].split('"', 1)[0]
    init.write_text(text.replace(f'__version__ = "{base}"', f'__version__ = "{base}+kvq.{version_label}"'))
    return src


def sync_tree(src: Path, dst: Path) -> int:
    """Make dst byte-identical to src, touching only files that differ. Returns files changed."""
    changed = 0
    dst.mkdir(parents=True, exist_ok=True)
    seen = set()
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            s, d = Path(dirpath) / name, dst / rel / name
            seen.add(rel / name)
            if d.is_file() and not d.is_symlink() and filecmp.cmp(s, d, shallow=False):
                continue
            if d.exists() or d.is_symlink():
                d.unlink()
            shutil.copy2(s, d)
            os.utime(d)  # newer than any object built from the old content
            changed += 1
    for dirpath, dirnames, filenames in os.walk(dst):
        rel = Path(dirpath).relative_to(dst)
        for name in filenames:
            if rel / name not in seen:
                (Path(dirpath) / name).unlink()
                changed += 1
    return changed


def build_wheel(src: Path, build_dir: Path, out: Path) -> Path:
    env = dict(os.environ)
    args = list(CMAKE_ARGS)
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    else:
        log("ccache not found: full rebuilds will be slow (apt-get install ccache)")
    env["CMAKE_ARGS"] = " ".join(args)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    tmp_out = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-wheel-"))
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_out),
             "-C", f"build-dir={build_dir}", "-C", "cmake.verbose=false", "-C", f"build.targets={';'.join(TOOLS)}",
             *[f"-Ccmake.define.{k}={v}" for k, v in CMAKE_DEFINES.items()], str(src)],
            env=env, stdout=sys.stderr, stderr=sys.stderr,
        )
        wheels = list(tmp_out.glob("*.whl"))
        if r.returncode != 0 or len(wheels) != 1:
            raise BuildError(f"wheel build failed (see log above; build dir {build_dir})")
        tmp_out.rename(out)  # atomic: a wheels/<key> dir exists only when complete
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    return next(out.glob("*.whl"))


def main() -> int:
    cache = Path(os.environ.get("KVQ_BUILD_CACHE", Path.home() / ".cache" / "kvq-build"))
    try:
        upstream = read_upstream()
        patches = patch_series()
        sources = source_files()
        key = series_key(upstream, patches, sources)
        out = cache / "wheels" / key
        cached = list(out.glob("*.whl")) if out.is_dir() else []
        if cached:
            log(f"cached wheel for series {key}")
            print(cached[0])
            return 0
        cache.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        sdist = fetch_sdist(cache, upstream)
        log(f"applying {len(patches)} patch(es) and {len(sources)} new source file(s) to llama-cpp-python"
            f" {upstream['LLAMA_CPP_PYTHON_VERSION']} (llama.cpp {upstream['LLAMA_CPP_COMMIT']})")
        with tempfile.TemporaryDirectory(dir=cache, prefix=".stage-") as work:
            staged = stage(sdist, patches, sources, Path(work), key)
            n = sync_tree(staged, cache / "src")
        log(f"{n} source file(s) changed; building (kept build dir {cache / 'build'})")
        wheel = build_wheel(cache / "src", cache / "build", out)
        log(f"built {wheel.name}")
        print(wheel)
        return 0
    except BuildError as e:
        print(f"build_runtime: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
