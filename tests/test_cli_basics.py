"""CLI shell: help is instant (lazy imports), registry and resolution, inspect."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvq_cli.cli.app import app
from kvq_cli.gguf.keys import Controller
from kvq_cli.models.registry import DEFAULT_MODEL, REGISTRY, get_spec, resolve
from kvq_cli.errors import UnknownModel

from .conftest import write_tiny_gguf

HEAVY = ("llama_cpp", "numpy", "huggingface_hub", "gguf")


def test_help_imports_nothing_heavy():
    code = ("import sys; from typer.testing import CliRunner; from kvq_cli.cli.app import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("cmd", [c.name for c in app.registered_commands])
def test_every_command_has_help_and_example(runner, cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0
    assert "Example: kvq " in r.output


def test_registry_covers_smollm_families():
    assert len(REGISTRY) == 12
    assert get_spec("smollm-360m").repo_id == "HuggingFaceTB/SmolLM-360M"
    assert get_spec("SmolLM2-1.7B-Instruct").repo_id == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert get_spec("HuggingFaceTB/SmolLM2-135M").alias == "smollm2-135m"
    with pytest.raises(UnknownModel):
        get_spec("llama-7b")


def test_default_resolves_to_embedded(model_path):
    r = resolve(None)
    assert r.name == DEFAULT_MODEL and r.path == model_path
    assert r.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_models_json(runner, model_path):
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["alias"]: row for row in json.loads(r.stdout)}
    assert rows[DEFAULT_MODEL]["status"] == "embedded"
    assert rows[DEFAULT_MODEL]["path"] == str(model_path)
    assert rows["smollm-360m"]["status"] == "not downloaded"


def test_inspect_real_model(runner, model_path):
    r = runner.invoke(app, ["inspect", str(model_path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama"
    assert info["dims"] == {"n_layer": 30, "n_embd": 576, "n_head": 9, "n_head_kv": 3,
                            "head_dim": 64, "n_ctx_train": 8192, "n_vocab": 49152,
                            "kv_elems_per_token": 11520}
    assert info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert info["metadata"]["tokenizer.ggml.tokens"]["array_len"] == 49152
    assert info["kvq"] == {}
    table = runner.invoke(app, ["inspect", str(model_path)])
    assert table.exit_code == 0 and "SmolLM2" not in table.stderr
    assert "head dim" in table.stdout and "Q4_1: 210" in table.stdout


def test_inspect_shows_kvq_keys(runner, tmp_path):
    p = write_tiny_gguf(tmp_path / "c.gguf", {Controller.VERSION: 1, Controller.B2: [0.5, -1.0]})
    r = runner.invoke(app, ["inspect", str(p), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["kvq"] == {Controller.VERSION: 1, Controller.B2: [0.5, -1.0]}
    assert Controller.VERSION not in info["metadata"]
