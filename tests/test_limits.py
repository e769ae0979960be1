"""Models wider than the real one: KV rows of 8,192 channels (64 KV heads of 128), 128 query heads on one
KV head, and a head_dim kvq cannot store (96). The kvq cache runs the first two as the stock cache
does (its row buffers are sized at enable, no fixed bound; the AVX2 tiles fall back to the scalar
ones); the third is one clear error line, and runs with a stock cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvq_cli.cli.app import app
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.kv import parse_kv

from .conftest import TEXT
from .test_errors import assert_one_line_error
from .test_runtime import kl

SHAPES = {
    "wide": dict(n_layer=2, n_head=64, n_head_kv=64, head_dim=128, n_embd=256, n_ff=256),   # n_embd_kv 8192
    "gqa128": dict(n_layer=2, n_head=128, n_head_kv=1, head_dim=64, n_embd=256, n_ff=256),  # 128 query heads per KV head
    "hd96": dict(n_layer=1, n_head=4, n_head_kv=2, head_dim=96, n_ff=256),
}


@pytest.fixture(scope="module")
def shaped(tmp_path_factory, model_path):
    """name -> GGUF of that shape, made by the test converter and `kvq convert`."""
    from kvq_cli.models.convert import convert

    from .hf_fixture import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for name, shape in SHAPES.items():
        ckpt = build_tiny_checkpoint(model_path, root / name, **shape)
        out[name] = convert(ckpt, root / f"{name}.gguf").out
    return out


N = 64   # tokens decoded


def _logits(path: Path, kv: str, n: int = N):
    with Engine(path, kv=parse_kv(kv), n_ctx=256) as e:
        toks = e.tokenize(TEXT)[:n]
        return e.decode(toks, 0, logits_from=0).astype(np.float64), e.kv_stats(), e.dims


@pytest.mark.parametrize("name", ["wide", "gqa128"])
def test_wide_models_run_the_kvq_cache_as_stock_does(shaped, name):
    ref, _, dims = _logits(shaped[name], "stock-f16")
    ours, st, _ = _logits(shaped[name], "f16")
    n_embd_kv = dims.n_head_kv * dims.head_dim
    assert n_embd_kv == SHAPES[name]["n_head_kv"] * SHAPES[name]["head_dim"]
    assert kl(ref, ours) < 1e-4 and np.abs(ref - ours).max() < 0.05   # the f16 pool: stock attention
    assert st.bytes_held == N * dims.n_layer * 2 * n_embd_kv * 2     # every row at the model's full width
    q4, st4, _ = _logits(shaped[name], "q4")
    stock_q4 = _logits(shaped[name], "stock-q4_0")[0]
    # the 4-bit pool does the damage llama.cpp's own q4_0 cache does (KL ~0.16 on this random model)
    assert 0.5 < kl(ref, q4) / kl(ref, stock_q4) < 1.5
    assert st4.bytes_held == N * dims.n_layer * 2 * n_embd_kv // 32 * 18


def test_wide_model_chats_with_the_adaptive_cache(runner, shaped):
    r = runner.invoke(app, ["chat", str(shaped["wide"]), "-p", "Name three colours.", "--max-tokens", "8", "--ctx", "256"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and "KV adaptive@3.5" in r.stderr


def test_head_dim_kvq_cannot_store_is_one_line(runner, shaped):
    for kv in ("adaptive", "q4"):
        r = runner.invoke(app, ["chat", str(shaped["hd96"]), "-p", "hi", "--kv", kv, "--ctx", "128"])
        assert_one_line_error(r, "head_dim % 64 == 0", "head_dim is 96", "stock-f16")
    r = runner.invoke(app, ["chat", str(shaped["hd96"]), "-p", "hi", "--kv", "stock-f16", "--max-tokens", "4", "--ctx", "128"])
    assert r.exit_code == 0, r.output
