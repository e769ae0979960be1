"""llama.cpp's tools from the runtime wheel: installed, linked into the venv, on Python's libllama, serving."""
from __future__ import annotations

import filecmp
import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvq_cli.errors import RuntimeMissing
from kvq_cli.runtime.tools import TOOLS, lib_dir, tool_path

from .conftest import ROOT

# urllib would send even 127.0.0.1 through an http_proxy from the environment
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_tools_are_the_ones_the_build_builds():
    spec = importlib.util.spec_from_file_location("build_runtime", ROOT / "scripts" / "build_runtime.py")
    build_runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_runtime)
    assert build_runtime.TOOLS == TOOLS


@pytest.mark.parametrize("name", TOOLS)
def test_tool_is_installed_and_linked_into_the_venv(name):
    path = tool_path(name)
    assert path == lib_dir() / name
    assert (Path(sys.prefix) / "bin" / name).resolve() == path.resolve()


@pytest.mark.parametrize("name", TOOLS)
def test_tool_runs(name):
    """Through the venv's link, as a user runs it: the loader must find libllama from the real file."""
    r = subprocess.run([Path(sys.prefix) / "bin" / name, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"version: \d+", r.stdout + r.stderr), r.stdout + r.stderr


def test_missing_tool_is_a_runtime_missing_error():
    with pytest.raises(RuntimeMissing) as e:
        tool_path("llama-no-such-tool")
    line = e.value.one_line()
    assert "\n" not in line and "llama-no-such-tool" in line and "make setup" in line


def _mapped(pattern: str) -> list[Path]:
    """Files this process has mapped whose name matches pattern."""
    fields = (line.split(None, 5) for line in Path("/proc/self/maps").read_text().splitlines())
    return sorted({Path(f[5]) for f in fields if len(f) == 6 and re.fullmatch(pattern, Path(f[5]).name)})


@pytest.mark.parametrize("name", TOOLS)
def test_tool_loads_the_libllama_python_loads(name):
    import llama_cpp  # noqa: F401  (maps libllama)

    (python_lib,) = _mapped(r"libllama\.so(\.\d+)*")
    # on the real file: ldd takes $ORIGIN from the path it is given, which for the venv's link is .venv/bin
    ldd = subprocess.run(["ldd", tool_path(name)], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "not found" not in ldd, ldd
    resolved = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.MULTILINE))
    tool_lib = Path(resolved["libllama.so.0"])
    # rpath $ORIGIN: the llama_cpp package's lib/; a wheel holds no symlinks, so libllama.so (Python's
    # ctypes) and libllama.so.0 (the soname the tools ask for) are two copies of one build there
    assert tool_lib.parent == python_lib.parent == lib_dir()
    assert filecmp.cmp(tool_lib, python_lib, shallow=False)
    for soname in ("libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0"):
        assert Path(resolved[soname]).parent == lib_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float):
    with LOCAL.open(url, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def test_server_answers_health_and_completion(model_path, tmp_path):
    port, log = _free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([tool_path("llama-server"), "-m", model_path, "--host", "127.0.0.1", "--port",
                                 str(port), "-np", "1", "-c", "512", "--threads", "2"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = _get(f"{base}/health", timeout=5)
                break
            except OSError:   # not listening yet, or 503 (an HTTPError) while the model loads
                time.sleep(0.2)
        assert health == (200, {"status": "ok"}), log.read_text()[-3000:]
        body = json.dumps({"prompt": "The capital of France is", "n_predict": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/completion", body, {"Content-Type": "application/json"})
        with LOCAL.open(req, timeout=60) as r:
            assert r.status == 200
            done = json.loads(r.read())
        assert 1 <= done["tokens_predicted"] <= 8
        assert done["content"].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
