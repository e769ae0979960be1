"""The patched runtime: kvq precision pools against stock llama.cpp and a NumPy reference."""
from __future__ import annotations

import ctypes
import functools
import json
from pathlib import Path

import numpy as np
import pytest

from kvq_cli.cli.app import app
from kvq_cli.errors import BadOption, ControllerError
from kvq_cli.runtime._lib import kvq_lib
from kvq_cli.runtime.inspector import Inspector
from kvq_cli.runtime.kv import KvPolicy, KvqOptions, parse_kv

from .conftest import GOLDEN, TEXT, TINY_EMBD_KV, TINY_LAYERS
from .test_errors import assert_one_line_error

N_LAYER, N_EMBD_KV = 30, 192   # the real model


def row_bytes(n_embd_kv: int) -> dict[str, int]:
    """Bytes of one token-layer K (or V) row per pool; k4v2: the mean of its q4_0 K row and kvq2 V row."""
    q4, q2 = n_embd_kv // 32 * 18, n_embd_kv // 64 * 18
    return {"f16": 2 * n_embd_kv, "q8": n_embd_kv // 32 * 34, "q4": q4, "k4v2": (q4 + q2) // 2, "q2": q2}


ROW_BYTES = row_bytes(N_EMBD_KV)
assert ROW_BYTES == {"f16": 384, "q8": 204, "q4": 108, "k4v2": 81, "q2": 54}
ASSIGN = KvPolicy("assign", kvq="assign")


def _dims(model):
    """(n_layer, n_embd_kv) of the tiny model (conftest) or the real one."""
    return (TINY_LAYERS, TINY_EMBD_KV) if "tiny" in Path(model).name else (N_LAYER, N_EMBD_KV)


def _ptr(a, t=ctypes.c_float):
    return a.ctypes.data_as(ctypes.POINTER(t))


def run_logits(model, kv: str | KvPolicy, n_tokens=512, flash=None, n_ctx=1024, **kw):
    """Logits of the first n_tokens of TEXT, and the KV stats after."""
    policy = parse_kv(kv) if isinstance(kv, str) else kv
    with Inspector(model, kv=policy, n_ctx=n_ctx, logits_all=True, flash_attn=flash, **kw) as e:
        toks = e.tokenize(TEXT)[:n_tokens]
        assert len(toks) == n_tokens
        e.llm.eval(toks)
        return np.array(e.llm.scores[:n_tokens], dtype=np.float64), e.kv_stats()


def kl(a, b):
    def lsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    pa, pb = lsm(a), lsm(b)
    return float((np.exp(pa) * (pa - pb)).sum(-1).mean())


@pytest.fixture(scope="module")
def f16_ref(converted_f16):
    return run_logits(converted_f16, "stock-f16")[0]


def test_static_f16_matches_stock_f16(converted_f16, f16_ref):
    # f16 weights: no activation quantization, so the comparison is of attention alone.
    ours, st = run_logits(converted_f16, "f16")
    assert kl(f16_ref, ours) < 1e-4
    assert (f16_ref.argmax(-1) == ours.argmax(-1)).mean() > 0.99
    assert np.abs(f16_ref - ours).max() < 0.3
    assert st.rows == {"window": 0, "f16": 512 * N_LAYER, "q8": 0, "q4": 0, "k4v2": 0, "q2": 0, "drop": 0}


def test_static_f16_on_the_q4_1_model_is_within_stock_noise(model_path):
    # Q4_1 weights quantize activations to q8_1: tiny differences get amplified. Stock flash
    # vs non-flash attention shows that noise floor; ours must sit inside it.
    ref, _ = run_logits(model_path, "stock-f16", flash=False)
    flash, _ = run_logits(model_path, "stock-f16", flash=True)
    ours, _ = run_logits(model_path, "f16")
    floor = kl(ref, flash)
    assert kl(ref, ours) < 2 * floor + 1e-3, (kl(ref, ours), floor)


@pytest.mark.parametrize("ours,stock", [("q8", "stock-q8_0"), ("q4", "stock-q4_0")])
def test_static_quantized_matches_stock_damage(converted_f16, f16_ref, ours, stock):
    o, st = run_logits(converted_f16, ours)
    s, _ = run_logits(converted_f16, stock)
    k_ours, k_stock = kl(f16_ref, o), kl(f16_ref, s)
    assert 0.5 * k_stock <= k_ours <= 1.25 * k_stock, (k_ours, k_stock)
    assert (o.argmax(-1) == s.argmax(-1)).mean() > 0.85


def test_2bit_is_usable_where_stock_q2_0_is_not(converted_f16, f16_ref):
    o, st = run_logits(converted_f16, "q2")
    s, _ = run_logits(converted_f16, "stock-q2_0")
    assert st.bits_per_elem == 2.25
    assert kl(f16_ref, o) < 0.3 * kl(f16_ref, s)


def test_kvq2_codebook_beats_scalar_2bit_codes(model_path):
    # kvq2 codes each group of 4 (rotated) values as one of 256 codewords (patch 0001): normalised squared
    # error ~0.097 on Gaussian rows, where scalar 2-bit codes with the same f16 step per 64 values (the
    # layout before it) reach 0.113 at best (scripts/kvq2_layout/sim.c, layout C)
    x = np.random.default_rng(0).standard_normal((512, N_EMBD_KV)).astype(np.float32)
    with Inspector(model_path, kv=parse_kv("q2"), n_ctx=256) as e:
        y = e.roundtrip(2, x)
    assert 0.09 < float(((y - x) ** 2).sum() / (x ** 2).sum()) < 0.10


def test_k4v2_puts_the_bits_on_k(converted_f16, f16_ref):
    # K at 4 bits with V at 2: 3.375 bits/element, damage between q4 and q2, and (layer 0, whose
    # input no cache touches) a K read back exactly as q4 stores it, a V exactly as q2 does
    o, st = run_logits(converted_f16, "k4v2")
    assert st.bits_per_elem == 3.375 and st.rows["k4v2"] == 512 * N_LAYER
    q4, _ = run_logits(converted_f16, "q4")
    q2, _ = run_logits(converted_f16, "q2")
    assert kl(f16_ref, q4) < kl(f16_ref, o) < 0.5 * kl(f16_ref, q2)
    lib = kvq_lib()
    kv = {}
    for name in ("k4v2", "q4", "q2"):
        with Inspector(converted_f16, kv=parse_kv(name), n_ctx=256) as e:
            e.llm.eval(e.tokenize(TEXT)[:64])
            K, V = np.zeros((64, N_EMBD_KV), np.float32), np.zeros((64, N_EMBD_KV), np.float32)
            assert lib.llama_kvq_read_layer(e.llm.ctx, 0, _ptr(K), _ptr(V), None, None, 64) == 64
            kv[name] = K, V
            if name == "k4v2":
                with pytest.raises(BadOption, match="round-trip K at 4 and V at 2|pool 3 is K at 4 bits"):
                    e.roundtrip(3, K)
    np.testing.assert_array_equal(kv["k4v2"][0], kv["q4"][0])
    np.testing.assert_array_equal(kv["k4v2"][1], kv["q2"][1])


@pytest.mark.parametrize("kv", ["f16", "q8", "q4", "k4v2", "q2"])
def test_bytes_held_are_analytic(tiny_model, kv):
    n = 300
    n_layer, n_embd_kv = _dims(tiny_model)
    rb = row_bytes(n_embd_kv)
    _, st = run_logits(tiny_model, kv, n_tokens=n, n_ctx=512)
    assert st.tokens == n
    assert st.bytes_held == n * n_layer * 2 * rb[kv]
    assert st.bits_per_elem == pytest.approx(rb[kv] * 8 / n_embd_kv)
    if kv == "q4":
        assert st.bytes_held / (n * n_layer * 2 * rb["f16"]) == pytest.approx(0.28125)


def test_window_rows_in_q8_0(model_path, converted_f16, f16_ref):
    """KvqOptions.window_bits 8 (--kv-window-bits 8, the rule/adaptive default): window rows are held
    and paid for as q8_0 (204-byte rows), attention over them stays as close to f16 as a static q8
    cache, and rows leaving the window are coded from their q8_0 values."""
    n, w = 512, 16
    o16, st16 = run_logits(converted_f16, "f16", kvq=KvqOptions(window=n, window_bits=16))
    o8, st8 = run_logits(converted_f16, "f16", kvq=KvqOptions(window=n, window_bits=8))
    q8, _ = run_logits(converted_f16, "q8")
    assert st16.rows["window"] == st8.rows["window"] == n * N_LAYER
    assert st16.bytes_held == n * N_LAYER * 2 * ROW_BYTES["f16"]
    assert st8.bytes_held == n * N_LAYER * 2 * ROW_BYTES["q8"]
    assert kl(f16_ref, o16) < 1e-4
    assert 0 < kl(f16_ref, o8) < 2 * kl(f16_ref, q8) + 1e-4
    # static q4 behind a window of 16, 32-token ubatches (rows leave the window after each): the
    # exited rows cost q4, the window rows q8_0
    ub = dict(n_batch=32, n_ubatch=32)
    a, sa = run_logits(converted_f16, "q4", kvq=KvqOptions(window=w, window_bits=8), **ub)
    b, sb = run_logits(converted_f16, "q4", kvq=KvqOptions(window=w, window_bits=16), **ub)
    assert sa.rows["window"] == w * N_LAYER and sa.rows["q4"] == (n - w) * N_LAYER
    assert sa.bytes_held == N_LAYER * 2 * ((n - w) * ROW_BYTES["q4"] + w * ROW_BYTES["q8"])
    assert sb.bytes_held - sa.bytes_held == w * N_LAYER * 2 * (ROW_BYTES["f16"] - ROW_BYTES["q8"])
    print("q8_0 window: q4 behind it", kl(f16_ref, a), "behind f16", kl(f16_ref, b))
    assert kl(f16_ref, a) < 1.3 * kl(f16_ref, b)   # the q8_0 rounding adds little to q4's
    # who gets which window by default; a bad value is one clear error
    assert [KvqOptions().window_bits_for(parse_kv(k)) for k in ("rule", "adaptive", "q4", "oracle")] == [8, 8, 16, 16]
    with pytest.raises(BadOption, match="window bits must be 16 or 8"):
        Inspector(model_path, kv=parse_kv("rule"), n_ctx=64, kvq=KvqOptions(window_bits=4))


def _assigned_engine(model_path, n=200, seed=0):
    lib = kvq_lib()
    e = Inspector(model_path, kv=ASSIGN, n_ctx=512, kvq=KvqOptions(window=0))
    bits = np.random.default_rng(seed).choice([16, 8, 4, 3, 2, 0], size=n).astype(np.int32)
    bits[0] = 16   # (0 leaves the row out; position 0's query must see its own row below)
    assert lib.llama_kvq_set_assignment(e.llm.ctx, _ptr(bits, ctypes.c_int32), n) == 0
    e.llm.eval(e.tokenize(TEXT)[:n])
    return e, bits


def test_mixed_assignment_bytes_follow_the_mix(model_path):
    e, bits = _assigned_engine(model_path)
    with e:
        st = e.kv_stats()
        counts = {b: int((bits == b).sum()) for b in (16, 8, 4, 3, 2, 0)}
        assert st.rows == {"window": 0, "f16": counts[16] * N_LAYER, "q8": counts[8] * N_LAYER,
                           "q4": counts[4] * N_LAYER, "k4v2": counts[3] * N_LAYER, "q2": counts[2] * N_LAYER,
                           "drop": counts[0] * N_LAYER}
        want = sum(counts[b] * N_LAYER * 2 * ROW_BYTES[k]
                   for b, k in ((16, "f16"), (8, "q8"), (4, "q4"), (3, "k4v2"), (2, "q2")))
        assert st.bytes_held == want
        # rows left out hold no bytes but stay elements of the context: bits/element are per position
        assert st.tokens == 200 and st.bits_per_elem == pytest.approx(8 * want / (200 * N_LAYER * 2 * N_EMBD_KV))


@pytest.mark.parametrize("il", [0, 17, 29])
def test_mixed_assignment_attention_matches_numpy(model_path, il):
    lib = kvq_lib()
    e, bits = _assigned_engine(model_path, seed=il)
    with e:
        n = 200
        K = np.zeros((n, N_EMBD_KV), np.float32)
        V = np.zeros_like(K)
        pos = np.zeros(n, np.int32)
        prec = np.zeros(n, np.int32)
        got = lib.llama_kvq_read_layer(e.llm.ctx, il, _ptr(K), _ptr(V), _ptr(pos, ctypes.c_int32),
                                       _ptr(prec, ctypes.c_int32), n)
        # rows assigned 0 bits are left out: not read back, not attended (the NumPy reference lacks them)
        kept = np.flatnonzero(bits != 0)
        assert 0 < (bits == 0).sum() and got == len(kept) and sorted(pos[:got]) == list(kept)
        n, K, V, pos, prec = got, K[:got], V[:got], pos[:got], prec[:got]
        cls = {16: 1, 8: 2, 4: 3, 3: 4, 2: 5}
        assert all(prec[i] == cls[bits[pos[i]]] for i in range(n))
        rng = np.random.default_rng(1)
        q = (rng.normal(size=(5, 9, 64)) * 2).astype(np.float32)
        qpos = np.array([199, 150, 60, 1, 0], np.int32)
        out = np.zeros_like(q)
        assert lib.llama_kvq_attend(e.llm.ctx, il, _ptr(q), 5, _ptr(qpos, ctypes.c_int32), _ptr(out)) == 0
        Kh, Vh = K.reshape(n, 3, 64), V.reshape(n, 3, 64)
        ref = np.zeros_like(out)
        for i in range(5):
            m = pos <= qpos[i]
            for h in range(9):
                s = Kh[m, h // 3] @ q[i, h] / 8.0
                p = np.exp(s - s.max())
                ref[i, h] = (p / p.sum()) @ Vh[m, h // 3]
        # the kernel dots q as f16 (f16 rows) or q8_0 (quantized rows), as llama.cpp does
        assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()
        assert np.abs(out[4] - Vh[pos == 0, np.arange(9) // 3]).max() < 1e-6  # position 0 sees itself only


def test_prefix_reuse_drops_removed_positions(model_path):
    toks = None
    with Inspector(model_path, kv=parse_kv("q4"), n_ctx=512, logits_all=True) as e:
        toks = e.tokenize(TEXT)[:160]
        other = toks[:80] + e.tokenize(" The quick brown fox jumps over the lazy dog." * 8)[:80]
        e.llm.eval(toks)
        e.llm.n_tokens = 80          # keep the shared prefix, as llama-cpp-python's prefix match does
        e.llm.eval(other[80:])
        reused = np.array(e.llm.scores[80:160])
        assert e.kv_stats().tokens == 160
    with Inspector(model_path, kv=parse_kv("q4"), n_ctx=512, logits_all=True) as e:
        e.llm.eval(other)
        fresh = np.array(e.llm.scores[80:160])
    np.testing.assert_allclose(reused, fresh, atol=1e-4)


@pytest.mark.parametrize("kv,budget", [("rule", 3.0), ("q8", 4.0)])
def test_budget_is_never_exceeded(tiny_model, kv, budget):
    n_ctx = 256
    n_layer, n_embd_kv = _dims(tiny_model)
    elems = 2 * n_layer * n_embd_kv   # K and V elements per token
    opts = KvqOptions(budget_bits=budget, window=4)
    with Inspector(tiny_model, kv=parse_kv(kv), n_ctx=n_ctx, kvq=opts, n_batch=64, n_ubatch=16) as e:
        toks = e.tokenize(TEXT)[: n_ctx - 8]
        cap = budget / 8 * n_ctx * elems
        for i in range(0, len(toks), 16):
            e.llm.eval(toks[i:i + 16])
            st = e.kv_stats()
            assert st.bytes_budget == int(cap)
            assert st.bytes_held <= st.bytes_budget
        assert st.bytes_held * 8 / (n_ctx * elems) <= budget
        assert st.budget_demotions > 0  # the policy alone would have used more bits
        assert sum(st.rows.values()) == len(toks) * n_layer


def test_rule_policy_keeps_sinks_and_traces_features(model_path):
    lib = kvq_lib()
    opts = KvqOptions(window=8, trace=True)
    with Inspector(model_path, kv=parse_kv("rule"), n_ctx=256, kvq=opts, n_batch=32, n_ubatch=8) as e:
        e.llm.eval(e.tokenize(TEXT)[:96])
        st = e.kv_stats()
        assert st.rows["window"] == 8 * N_LAYER and st.rows["f16"] >= 4 * N_LAYER
        tr = e.trace()
        pos, layer, bits, feat = tr.pos, tr.layer, tr.bits, tr.features
        assert len(pos) == 88  # one per token that left the window
        assert sorted(pos) == list(range(88)) and set(layer) == {-1}
        assert set(bits[pos < 4]) == {16} and set(bits) <= {16, 8, 4}
        names = tr.names
        assert names == ["token_freq", "quality", "attn_var", "attn_entropy", "layer_frac",
                         "position_frac", "k_absmax", "v_absmax", "attn_recv"] == lib.feature_names()
        assert np.isfinite(feat).all()
        f = dict(zip(names, feat.T))
        assert (f["token_freq"] > 0).all() and (f["token_freq"] <= 1).all()
        assert (f["quality"] > 0.01).all() and (f["quality"] < 1).all()   # 2-bit relative error
        assert (f["attn_entropy"] >= 0).all() and (f["attn_entropy"][1:] <= 1.0001).all()
        assert f["attn_var"].max() > 0 and (f["k_absmax"] > 0).all()
        # attn_recv is log(1 + received / uniform share), averaged over layers here: the rule's
        # heavy hitters (8 bits: mean received >= 2x uniform) receive more than the rest
        heavy, rest = f["attn_recv"][(bits == 8) & (pos >= 4)], f["attn_recv"][bits == 4]
        assert (f["attn_recv"] >= 0).all() and len(heavy) and len(rest) and heavy.mean() > rest.mean()


@functools.lru_cache(maxsize=2)
def _reader(path):
    """gguf-py's reader of a model (parsing its tokenizer takes seconds: once per model)."""
    from kvq_cli.gguf.read import read_gguf

    return read_gguf(path)


def _controller_gguf(tmp_path, model_path, items):
    from kvq_cli.gguf.write import copy_with_metadata

    out = tmp_path / "ctrl.gguf"
    copy_with_metadata(_reader(model_path), out, drop=lambda k: False, add=items)
    return out


def _adaptive_trace(path, ctrl):
    """The decisions an adaptive decode of 64 tokens of TEXT made (W = 8, ubatches of 8) and the
    controller's features of each, in its own order."""
    with Inspector(path, kv=parse_kv("adaptive"), n_ctx=256, kvq=KvqOptions(window=8, trace=True),
                n_batch=32, n_ubatch=8) as e:
        e.llm.eval(e.tokenize(TEXT)[:64])
        tr = e.trace()
    return tr, tr.features[:, [tr.names.index(f) for f in ctrl.features]]


def test_adaptive_with_embedded_controller(runner, tiny_model, tmp_path):
    from kvq_cli.controller.spec import load_controller

    ctrl = load_controller(GOLDEN / "controller_handmade.json")
    path = _controller_gguf(tmp_path, tiny_model, ctrl.gguf_items())
    lib = kvq_lib()
    tr, x = _adaptive_trace(path, ctrl)
    n, bits = len(tr.bits), tr.bits
    np.testing.assert_array_equal(bits, ctrl.decide(x))   # C decisions == NumPy decisions
    with Inspector(path, kv=parse_kv("adaptive"), n_ctx=64) as e:
        c_bits = np.zeros(n, np.int32)
        assert lib.llama_kvq_controller_eval(e.llm.model, _ptr(tr.features), n, _ptr(c_bits, ctypes.c_int32)) == 0
        np.testing.assert_array_equal(c_bits, bits)
    r = runner.invoke(app, ["chat", str(path), "--kv", "adaptive", "-p", "Hi!", "--max-tokens", "8", "--ctx", "128"])
    assert r.exit_code == 0 and r.stdout.strip(), r.output


def test_damage_floor_projects_the_estimates_in_c_as_in_numpy(tiny_model, tmp_path):
    """kvq.controller.damage_floor: the C decisions of an online decode equal ControllerSpec.decide with
    the projection, llama_kvq_controller_eval gives the same bits, and the projection changes decisions."""
    from kvq_cli.controller.spec import controller_from_reader, load_controller, project_damage
    from kvq_cli.gguf.read import read_gguf

    base = load_controller(GOLDEN / "controller_handmade.json")
    ctrl = load_controller(GOLDEN / "controller_handmade.json")
    ctrl.damage_floor = [30.0, 30.0, 1.0]
    ctrl.validate()
    path = _controller_gguf(tmp_path, tiny_model, ctrl.gguf_items())
    assert controller_from_reader(read_gguf(path)).damage_floor == ctrl.damage_floor
    tr, x = _adaptive_trace(path, ctrl)
    n, bits = len(tr.bits), tr.bits
    np.testing.assert_array_equal(bits, ctrl.decide(x))        # C online == NumPy
    assert (bits != base.decide(x)).any()                       # the projection matters
    eb = np.array([2.25, 4.5, 8.5, 16.0], np.float32)
    d = -(ctrl.logits(x) + eb)                                  # what decided: physical estimates
    assert (d[:, -1] >= 0).all() and (d[:, :-1] >= np.float32(30.0) * d[:, 1:] - 1e-6)[:, :2].all()
    np.testing.assert_allclose(d, project_damage(-(base.logits(x) + eb), ctrl.damage_floor), rtol=1e-6, atol=1e-6)
    with Inspector(path, kv=parse_kv("adaptive"), n_ctx=64) as e:
        c_bits = np.zeros(n, np.int32)
        assert kvq_lib().llama_kvq_controller_eval(e.llm.model, _ptr(tr.features), n, _ptr(c_bits, ctypes.c_int32)) == 0
        np.testing.assert_array_equal(c_bits, bits)


@pytest.mark.parametrize("change,needle", [
    ({"kvq.controller.w1": [1.0, 2.0]}, "kvq.controller.w1 has 2 values, expected 3x4"),
    ({"kvq.controller.b2": [0.0, float("nan"), 0.0, 0.0]}, "non-finite"),
    ({"kvq.controller.version": 9}, "unsupported controller version 9"),
    ({"kvq.controller.head": "softmax"}, "must be one of logits, log_damage"),
    ({"kvq.controller.damage_floor": [4.0, -1.0, 1.0]}, "damage_floor must be"),
    ({"kvq.controller.damage_floor": [4.0, 1.0]}, "damage_floor has 2 values, expected 3"),
])
def test_malformed_controller_metadata_is_a_clear_error(runner, tiny_model, tmp_path, change, needle):
    from kvq_cli.controller.spec import load_controller

    items = [(k, change.get(k, v), kind) for k, v, kind in load_controller(GOLDEN / "controller_handmade.json").gguf_items()]
    items += [(k, v, "f32[]") for k, v in change.items() if k not in {i[0] for i in items}]   # optional keys
    path = _controller_gguf(tmp_path, tiny_model, items)
    with pytest.raises(ControllerError, match=needle):
        Inspector(path, kv=parse_kv("adaptive"), n_ctx=128)
    # other policies still work on that file
    with Inspector(path, kv=parse_kv("q4"), n_ctx=128) as e:
        e.llm.eval(e.tokenize("Hello there")[:3])
    r = runner.invoke(app, ["chat", str(path), "--kv", "adaptive", "-p", "hi"])
    assert_one_line_error(r, needle)
    info = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    assert "error" in info["controller"]


def test_budget_too_small_is_a_clear_error(runner):
    r = runner.invoke(app, ["chat", "--kv", "rule", "--kv-bits", "2.1", "--kv-window", "64", "--ctx", "256", "-p", "hi"])
    assert_one_line_error(r, "budget too small")


@pytest.mark.parametrize("args,needle", [(["--kv", "rule", "--kv-window-bits", "4"], "--kv-window-bits must be 16 or 8"),
                                         (["--kv", "stock-f16", "--kv-window-bits", "8"], "apply to kvq policies")])
def test_bad_window_bits_are_a_clear_error(runner, args, needle):
    r = runner.invoke(app, ["chat", *args, "--ctx", "256", "-p", "hi"])
    assert_one_line_error(r, needle)


def _layer_rows(e, n, side=0):
    """K (side 1: V) of every layer [N_LAYER, n, N_EMBD_KV], rows in position order."""
    out = []
    for il in range(N_LAYER):
        kv = e.read_layer(il)
        assert len(kv[2]) == n
        out.append(kv[side][np.argsort(kv[2])])
    return np.stack(out)


def _assigned_logits(model, toks, bits, center=None, window=0, side=0, **kw):
    """(logits, K (side 1: V) of every layer read back); with record_q=True also each layer's queries in position order."""
    # 16-token ubatches: rows are stored at their precision after each ubatch (inside it they are f16)
    with Inspector(model, kv=ASSIGN, n_ctx=512, n_batch=16, n_ubatch=16, logits_all=True,
                kvq=KvqOptions(window=window, **kw)) as e:
        if center is not None:
            e.set_k_center(center)
        e.set_assignment(bits)
        e.llm.eval(toks)
        out = (np.array(e.llm.scores[:len(toks)], dtype=np.float64), _layer_rows(e, len(toks), side))
        if kw.get("record_q"):
            qs = [e.queries(il) for il in range(N_LAYER)]
            out += ([q[np.argsort(qpos)] for q, qpos in qs],)
        return out


def test_k_center_keeps_attention_and_lowers_quantized_damage(converted_f16):
    """Centered K (llama_kvq_set_k_center): every score of a query moves by q.mu, so f16 logits stay
    those of plain K, rows read back are K - mu, and 2-bit rows of K - mu lose less than of K.
    f16 weights: no activation quantization to amplify f16 rounding (see the test above)."""
    model_path = converted_f16
    n = 200
    with Inspector(model_path, kv=parse_kv("f16"), n_ctx=512) as e:
        toks = e.tokenize(TEXT)[:n]
    f16 = np.full(n, 16, np.int32)
    ref, K = _assigned_logits(model_path, toks, f16)
    mu = K[:, 1:].mean(1)
    assert (mu ** 2).sum(-1).mean() > 0.3 * (K[:, 1:] ** 2).sum(-1).mean()   # much of K's energy is its mean
    got, Kc = _assigned_logits(model_path, toks, f16, center=mu)
    assert kl(ref, got) < 1e-4 and (ref.argmax(-1) == got.argmax(-1)).mean() > 0.99
    assert np.abs(Kc - (K - mu[:, None])).max() < 0.02 * np.abs(K).max()   # f16 rounding only
    # the attention sink (position 0) at f16, every other row at 2 bits
    two = np.full(n, 2, np.int32)
    two[0] = 16
    plain = kl(ref, _assigned_logits(model_path, toks, two)[0])
    centered = kl(ref, _assigned_logits(model_path, toks, two, center=mu)[0])
    assert centered < 0.8 * plain, (centered, plain)
    with Inspector(model_path, kv=ASSIGN, n_ctx=64) as e:
        with pytest.raises(BadOption, match="n_layer x n_embd_kv = 5760"):
            e.set_k_center(mu[:2])
        e.llm.eval(toks[:4])
        with pytest.raises(BadOption, match="before any row is stored"):
            e.set_k_center(mu)


def test_k_center_travels_in_the_gguf(runner, model_path, tmp_path):
    """kvq.controller.k_center: written by embed, read back by Python and by the runtime (mixed-precision
    policies center K with it; static ones store K as is); a wrong shape is one clear line."""
    from kvq_cli.controller.spec import controller_from_reader, load_controller
    from kvq_cli.controller.embed import embed
    from kvq_cli.gguf.read import read_gguf

    mu = np.random.default_rng(0).normal(size=(N_LAYER, N_EMBD_KV)).astype(np.float32)
    ctrl = load_controller(GOLDEN / "controller_handmade.json")
    ctrl.k_center = mu.tolist()
    path = tmp_path / "c.gguf"
    embed(model_path, ctrl, path)
    back = controller_from_reader(read_gguf(path))
    np.testing.assert_array_equal(np.array(back.k_center, np.float32), mu)
    with Inspector(model_path, kv=parse_kv("f16"), n_ctx=128) as e:
        toks = e.tokenize(TEXT)[:16]
    ks = {}
    for name, kv in (("plain", parse_kv("f16")), ("static", parse_kv("f16")), ("assign", ASSIGN)):
        with Inspector(model_path if name == "plain" else path, kv=kv, n_ctx=128, kvq=KvqOptions(window=0)) as e:
            e.llm.eval(toks)
            ks[name] = _layer_rows(e, len(toks))
    np.testing.assert_array_equal(ks["static"], ks["plain"])
    assert np.abs(ks["assign"] - (ks["plain"] - mu[:, None])).max() < 0.02 * np.abs(ks["plain"]).max()
    ctrl.k_center = mu[:, :64].tolist()
    with pytest.raises(ControllerError, match="k_center is 30x64, but .* needs n_layer x n_embd_kv = 30x192"):
        embed(model_path, ctrl, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()
    for n in (7, 60):   # Python's reader refuses 7; 60 is 30 rows of 2, which the runtime refuses
        items = load_controller(GOLDEN / "controller_handmade.json").gguf_items() + [("kvq.controller.k_center", [0.5] * n, "f32[]")]
        bad = _controller_gguf(tmp_path, model_path, items)
        r = runner.invoke(app, ["chat", str(bad), "--kv", "adaptive", "-p", "hi"])
        assert_one_line_error(r, f"kvq.controller.k_center has {n} values")
    r = runner.invoke(app, ["chat", "--kv", "q4", "--kv-center", "maybe", "-p", "hi"])
    assert_one_line_error(r, "--kv-center must be auto, on or off")
    r = runner.invoke(app, ["chat", "--kv", "stock-f16", "--kv-center", "on", "-p", "hi"])
    assert_one_line_error(r, "apply to kvq policies")


def test_v_unbias_keeps_each_v_head_projection(model_path):
    """v_unbias (on for mixed-precision caches): a 2-bit V head decodes with its projection on the
    original exact, where the least-squares block scale shrinks it by its relative error (~11%),
    a shrink the attention output would add up. On an all-2-bit cache the logits get closer to f16."""
    n, window = 256, 16
    with Inspector(model_path, kv=parse_kv("f16"), n_ctx=512) as e:
        toks = e.tokenize(TEXT)[:n]
    ref, V = _assigned_logits(model_path, toks, np.full(n, 16, np.int32), side=1)
    two = np.full(n, 2, np.int32)
    got = {unb: _assigned_logits(model_path, toks, two, window=window, side=1, v_unbias=unb) for unb in (False, True)}
    stored = slice(0, n - window)      # rows that left the window into the 2-bit pool
    v = V[0, stored].reshape(-1, 64).astype(np.float64)   # layer 0: its V does not depend on the cache
    proj = {}
    for unb, (_, Vx) in got.items():
        vx = Vx[0, stored].reshape(-1, 64).astype(np.float64)
        proj[unb] = float(np.median((vx * v).sum(1) / (v * v).sum(1)))
    scored = slice(2 * window, None)
    kls = {unb: kl(ref[scored], logits[scored]) for unb, (logits, _) in got.items()}
    print("v_unbias test:", proj, kls)
    assert proj[False] < 0.93 and abs(proj[True] - 1.0) < 0.002, proj
    assert kls[True] < kls[False], kls
    # the training round trip of V rows (Engine.roundtrip(v=True)) stores them exactly as the pool did
    for unb, (_, Vx) in got.items():
        with Inspector(model_path, kv=ASSIGN, n_ctx=512, kvq=KvqOptions(v_unbias=unb)) as e:
            np.testing.assert_array_equal(e.roundtrip(2, V[0, stored], v=True), Vx[0, stored])


def test_query_aware_rounding_protects_the_attending_direction(model_path):
    """Query-aware rounding (qar_mu > 0, the default) codes a K row leaving the window so that its
    error along the queries that attended to it is small. Against plain rounding (qar_mu 0) on the
    same all-2-bit cache: the later queries' attention-weighted score error of the 2-bit rows is
    much lower, their plain squared error only a little higher, and the logits are closer to f16."""
    n, window = 256, 16
    with Inspector(model_path, kv=parse_kv("f16"), n_ctx=512) as e:
        toks = e.tokenize(TEXT)[:n]
    ref, K = _assigned_logits(model_path, toks, np.full(n, 16, np.int32))
    two = np.full(n, 2, np.int32)
    plain, Kp, qs = _assigned_logits(model_path, toks, two, window=window, record_q=True, qar_mu=0.0)
    qar, Kq, _ = _assigned_logits(model_path, toks, two, window=window, record_q=True, qar_mu=0.25)
    assert np.abs(Kp - K).max() > 0 and np.abs(Kq - Kp).max() > 0   # both are quantized, and differ
    err = {"plain": 0.0, "qar": 0.0}
    mse = {"plain": 0.0, "qar": 0.0}
    pos = np.arange(n)
    later = pos[:, None] > pos[None, :] + window       # queries that saw the row stored
    dks = {name: (Kx - K).reshape(N_LAYER, n, 3, 64) for name, Kx in (("plain", Kp), ("qar", Kq))}
    for name, dk in dks.items():
        mse[name] = float((dk ** 2).sum())
    for il in range(N_LAYER):
        q = qs[il]                                     # [n, 9, 64], position order
        for h in range(9):
            g = h // 3
            s = q[:, h] @ K[il][:, g * 64:(g + 1) * 64].T / 8.0
            s = np.where(pos[:, None] >= pos[None, :], s, -np.inf)
            a = np.exp(s - s.max(1, keepdims=True))
            a /= a.sum(1, keepdims=True)
            w = np.where(later, a * a, 0.0)
            for name, dk in dks.items():
                ds = q[:, h] @ dk[il, :, g].T / 8.0
                err[name] += float((w * ds * ds).sum())
    assert err["qar"] < 0.7 * err["plain"], err
    assert mse["qar"] < 1.3 * mse["plain"], mse
    scored = slice(2 * window, None)   # positions with stored rows behind them
    kl_plain, kl_qar = kl(ref[scored], plain[scored]), kl(ref[scored], qar[scored])
    print("qar test:", err, mse, kl_plain, kl_qar)
    assert kl_qar < kl_plain
