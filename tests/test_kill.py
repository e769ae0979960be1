"""SIGKILL mid-write: `kvq convert` and `kvq pull` leave nothing at the destination, and the next run
of the same output removes the dead writer's hidden temp file and writes a valid GGUF."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvq_cli.gguf.preflight import preflight
from kvq_cli.gguf.write import atomic_output, remove_stale_temps

from .test_pull import COMMIT

# ~110 MB of f16 tensors: the write takes long enough to be caught while it grows
BIG = dict(n_layer=8, n_head=8, n_head_kv=2, head_dim=64, n_ff=2048)
KILL_AT = 16 << 20   # temp file bytes: past the header, well short of the end


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory, model_path) -> Path:
    from .hf_fixture import build_tiny_checkpoint

    return build_tiny_checkpoint(model_path, tmp_path_factory.mktemp("big") / "big-llama", **BIG)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KVQ_"))}
    return {**env, **extra}


def _temps(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.kvq-*.tmp"))


def _kill_mid_write(args: list[str], env: dict[str, str], dest: Path) -> int:
    """Start `python -m kvq_cli ARGS`, SIGKILL it while its temp file next to `dest` grows; the temp size."""
    proc = subprocess.Popen([sys.executable, "-m", "kvq_cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            sizes = [p.stat().st_size for p in _temps(dest) if p.exists()]
            if sizes and max(sizes) >= KILL_AT:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return max(sizes)
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pytest.fail(f"never saw the temp file grow past {KILL_AT} bytes (exit {proc.returncode})")


def _check_killed_then_rerun(args: list[str], env: dict[str, str], dest: Path) -> None:
    size = _kill_mid_write(args, env, dest)
    assert not dest.exists(), "a partial output at the destination"
    left = _temps(dest)
    assert len(left) == 1 and left[0].stat().st_size >= size   # the dead writer's hidden temp
    r = subprocess.run([sys.executable, "-m", "kvq_cli", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _temps(dest) == [], "the rerun left the dead writer's temp file"
    assert size < dest.stat().st_size   # it was killed mid-write
    head = preflight(dest)   # complete and loadable
    assert len(head.tensors) == 2 + 9 * BIG["n_layer"] and head.data_offset + head.tensors[-1].offset < dest.stat().st_size


def test_convert_killed_mid_write(tmp_path, big_checkpoint):
    dest = tmp_path / "out" / "big.gguf"
    dest.parent.mkdir()
    _check_killed_then_rerun(["convert", str(big_checkpoint), "--out", str(dest), "--no-calibrate"], _env(), dest)


def test_pull_killed_mid_write(tmp_path, big_checkpoint):
    import shutil

    # the checkpoint as huggingface-hub's cache holds it: kvq pull finds it offline and converts it
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-360M"
    shutil.copytree(big_checkpoint, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    home = tmp_path / "home"
    env = _env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), KVQ_HOME=str(home))
    dest = home / "models" / "smollm2-360m-f16.gguf"
    _check_killed_then_rerun(["pull", "smollm2-360m", "--no-calibrate"], env, dest)


def test_stale_temps_of_live_writers_and_other_outputs_stay(tmp_path):
    out = tmp_path / "m.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".m.gguf.kvq-{dead.stdout.strip()}-abc.tmp"
    live = tmp_path / f".m.gguf.kvq-{os.getppid()}-def.tmp"           # the test runner's parent: running
    other = tmp_path / f".other.gguf.kvq-{dead.stdout.strip()}-ghi.tmp"  # another output's
    for p in (stale, live, other):
        p.write_text("partial")
    assert remove_stale_temps(out) == [stale]
    with atomic_output(out) as tmp:
        assert tmp.name.startswith(f".m.gguf.kvq-{os.getpid()}-")
        tmp.write_text("whole")
    assert out.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.gguf", live.name, other.name])
