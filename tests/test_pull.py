"""`kvq pull` through huggingface-hub's own offline mechanisms; nothing pretends to download."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from kvq_cli.cli.app import app
from kvq_cli.models.hub import ALLOW_PATTERNS

from .test_errors import assert_one_line_error

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str) -> Path:
    """A hub cache entry laid out exactly as huggingface-hub writes it (refs + snapshots)."""
    from safetensors.numpy import save_file

    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (snap / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (snap / "tokenizer.json").write_text("{}")
    save_file({"model.norm.weight": np.ones(8, dtype=np.float32)}, str(snap / "model.safetensors"))
    return snap


def run_kvq(args, env_extra, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "kvq_cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_pull_from_hub_cache_offline_then_convert_fails_cleanly(tmp_path):
    # huggingface-hub finds the cached snapshot offline; its config is incomplete, so the
    # conversion that follows fails in one line and leaves no GGUF behind.
    make_hub_cache(tmp_path / "hub", "HuggingFaceTB/SmolLM2-360M")
    home = tmp_path / "home"
    r = run_kvq(["pull", "smollm2-360m"], {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
                                           "KVQ_HOME": str(home)})
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["kvq: error: config.json lacks num_attention_heads"]
    assert r.stdout == ""
    assert not (home / "models").exists() or not any((home / "models").iterdir())


def test_pull_offline_without_cache_fails_cleanly(tmp_path):
    r = run_kvq(["pull", "smollm-135m"], {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HuggingFaceTB/SmolLM-135M" in lines[0] and "offline" in lines[0]
    assert not list((tmp_path).rglob("*.safetensors"))


def test_pull_passes_hub_arguments(runner, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def recording_snapshot_download(**kwargs):
        calls.append(kwargs)
        raise LocalEntryNotFoundError("no network in this test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording_snapshot_download)
    r = runner.invoke(app, ["pull", "smollm2-1.7b-instruct", "--revision", "v1"])
    assert_one_line_error(r, "HuggingFaceTB/SmolLM2-1.7B-Instruct")
    assert len(calls) == 1
    call = calls[0]
    assert call["repo_id"] == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert call["revision"] == "v1"
    assert call["allow_patterns"] == ALLOW_PATTERNS
    assert "*.safetensors" in call["allow_patterns"] and "*.bin" not in call["allow_patterns"]
    assert issubclass(call["tqdm_class"], __import__("tqdm").tqdm)


def test_pull_embedded_downloads_nothing(runner, monkeypatch, model_path):
    import huggingface_hub

    def no_download(**kwargs):
        raise AssertionError("the embedded model must not be downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    r = runner.invoke(app, ["pull", "smollm2-135m-instruct"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"smollm2-135m-instruct: {model_path}"


def test_rich_progress_bridge_counts():
    from rich.progress import Progress

    from kvq_cli.models.hub import rich_tqdm_class

    with Progress(disable=True) as progress:
        bar = rich_tqdm_class(progress)(total=10, desc="model.safetensors")
        bar.update(4)
        bar.update(6)
        bar.close()
        (task,) = progress.tasks
        assert task.description == "model.safetensors"
        assert task.completed == 10 and task.total == 10
