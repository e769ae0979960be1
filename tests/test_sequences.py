"""Several sequences in one kvq cache (llama.cpp's seq_id, llama-server's slots): each sequence
attends to its own rows only, seq_rm/seq_cp/seq_keep reach the kvq rows, one budget holds for all,
and a shift (seq_add: llama.cpp's context shift) moves every row as the stock cache does."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kvq_cli.runtime._lib import POLICY_LEARNED, POLICY_STATIC, KvqParams, KvqStats, kvq_lib

from .conftest import TEXT

llama_cpp = pytest.importorskip("llama_cpp")


class MultiSeq:
    """A raw llama.cpp context with n_seq sequences and a kvq cache from a --kvq spec (llama-server's setup)."""

    def __init__(self, model_path, spec: str, n_seq: int, n_ctx: int = 512, window: int | None = None,
                 n_batch: int = 256, controller=None):
        self.lib = kvq_lib()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
        assert self.model
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = 2
        p = KvqParams()
        assert self.lib.llama_kvq_params_from_spec(spec.encode(), ctypes.byref(p)) == 0, self.lib.last_error()
        if window is not None:
            p.window = window
        if controller is not None:
            p.controller_path = str(controller).encode()
        # as llama.cpp's tools create it: the stock KV tensors get no memory, one unified cache
        self.ctx = self.lib.llama_kvq_init_from_model(self.model, cp, ctypes.byref(p))
        assert self.ctx, self.lib.last_error()
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def decode(self, items: list[tuple[int, int, int]]) -> int:
        """Decode (seq, pos, token) items in one batch, logits for every item; llama_decode's return code."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (seq, pos, tok) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, True
            b.seq_id[i][0] = seq
        return llama_cpp.llama_decode(self.ctx, b)

    def logits(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()

    def stats(self) -> KvqStats:
        st = KvqStats()
        assert self.lib.llama_kvq_get_stats(self.ctx, ctypes.byref(st)) == 0
        return st

    def close(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def _tokens(model_path, text: str, n: int) -> list[int]:
    from kvq_cli.runtime.engine import Engine
    from kvq_cli.runtime.kv import parse_kv

    with Engine(model_path, kv=parse_kv("stock-f16"), n_ctx=64) as e:
        return e.tokenize(text)[:n]


@pytest.fixture(scope="module")
def generic_controller(tmp_path_factory):
    """The generic controller as a controller file: its running feature statistics (norm_prior) are state."""
    from kvq_cli.controller.catalog import GENERIC
    from kvq_cli.controller.embed import write_controller_file
    from kvq_cli.controller.spec import load_controller

    return write_controller_file(load_controller(GENERIC), tmp_path_factory.mktemp("ctrl") / "generic.gguf")


def _run_alone(model_path, spec, toks, n_seq: int = 1, **kw):
    """Logits of every token of one sequence decoded alone (in sequence 0 of a context with n_seq
    sequences: a server with its other slots idle), in chunks of 16 as a slot's prompt arrives."""
    m = MultiSeq(model_path, spec, n_seq=n_seq, **kw)
    try:
        out = []
        for i in range(0, len(toks), 16):
            chunk = toks[i:i + 16]
            assert m.decode([(0, i + j, t) for j, t in enumerate(chunk)]) == 0
            out += [m.logits(j) for j in range(len(chunk))]
        return np.array(out)
    finally:
        m.close()


def test_spec_parsing_names_every_policy():
    lib = kvq_lib()
    p = KvqParams()
    assert lib.llama_kvq_params_from_spec(b"adaptive@3", ctypes.byref(p)) == 0
    assert (p.policy, p.window, p.window_bits) == (POLICY_LEARNED, -1, 8)
    assert p.budget_bits == pytest.approx(3.0)
    assert lib.llama_kvq_params_from_spec(b"q4", ctypes.byref(p)) == 0
    assert (p.policy, p.static_bits, p.k_center, p.v_unbias, p.budget_bits) == (POLICY_STATIC, 4, 0, 0, 0.0)
    assert lib.llama_kvq_params_from_spec(b"rule@3", ctypes.byref(p)) == 0
    assert p.rule_base_bits == 2   # below 4 bits the rule's base is 2-bit, as `kvq --kv rule@3`
    for bad, why in ((b"q3", "unknown kvq policy"), (b"q4@3", "fixed size"), (b"adaptive@1", "between 2 and 16"),
                     (b"adaptive@x", "between 2 and 16")):
        assert lib.llama_kvq_params_from_spec(bad, ctypes.byref(p)) == -1
        assert why in lib.last_error()


def test_a_bad_kvq_context_is_refused_in_one_line(tiny_model):
    lib = kvq_lib()
    model = llama_cpp.llama_model_load_from_file(str(tiny_model).encode(), llama_cpp.llama_model_default_params())
    try:
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = 256
        p = KvqParams()
        assert lib.llama_kvq_params_from_spec(b"adaptive@2.1", ctypes.byref(p)) == 0
        assert not lib.llama_kvq_init_from_model(model, cp, ctypes.byref(p))   # no controller in the tiny model
        assert "no kvq controller" in lib.last_error()
        p.policy, p.budget_bits = POLICY_STATIC, 0.0
        p.window = -2
        assert not lib.llama_kvq_init_from_model(model, cp, ctypes.byref(p))
        assert "window must be >= 0" in lib.last_error()
    finally:
        llama_cpp.llama_model_free(model)


@pytest.mark.parametrize("spec", ["q4", "rule@3", "adaptive@3"])
def test_each_sequence_attends_to_its_own_rows(tiny_model, generic_controller, spec):
    # three prompts decoded together (their chunks interleaved in each batch, as llama-server batches
    # its slots) give each the logits it gets alone; adaptive runs the generic controller, whose running
    # statistics, price and window features are each sequence's own
    n = 64
    texts = [TEXT[:2000], TEXT[3000:5000], TEXT[6000:8000]]
    seqs = [_tokens(tiny_model, t, n) for t in texts]
    kw = {"window": 8, "controller": generic_controller if spec.startswith("adaptive") else None}
    alone = [_run_alone(tiny_model, spec, s, n_seq=3, **kw) for s in seqs]   # the same cache, the other slots idle
    m = MultiSeq(tiny_model, spec, n_seq=3, **kw)
    try:
        got = [[] for _ in seqs]
        for i in range(0, n, 16):
            items = [(k, i + j, seqs[k][i + j]) for k in range(3) for j in range(16)]
            assert m.decode(items) == 0
            for r, (k, _, _) in enumerate(items):
                got[k].append(m.logits(r))
        st = m.stats()
        assert st.n_tokens == 3 * n
        for k in range(3):
            np.testing.assert_allclose(np.array(got[k]), alone[k], atol=2e-3, rtol=0)
    finally:
        m.close()


def test_seq_cp_keep_and_middle_rm_reach_the_kvq_rows(tiny_model):
    toks = _tokens(tiny_model, TEXT, 96)
    alone = _run_alone(tiny_model, "rule@3", toks, window=8)
    m = MultiSeq(tiny_model, "rule@3", n_seq=2, window=8)
    try:
        for i in range(0, 64, 16):   # the shared prefix in sequence 0
            assert m.decode([(0, i + j, toks[i + j]) for j in range(16)]) == 0
        llama_cpp.llama_memory_seq_cp(m.mem, 0, 1, -1, -1)   # a prompt-cache copy to another slot
        held = m.stats().bytes_held
        assert m.stats().n_tokens == 128
        got = []
        for i in range(64, 96, 16):  # sequence 1 goes on from the copied prefix
            assert m.decode([(1, i + j, toks[i + j]) for j in range(16)]) == 0
            got += [m.logits(j) for j in range(16)]
        np.testing.assert_allclose(np.array(got), alone[64:96], atol=2e-3, rtol=0)
        llama_cpp.llama_memory_seq_keep(m.mem, 1)            # sequence 0 leaves
        st = m.stats()
        assert st.n_tokens == 96
        assert st.bytes_held < held + 32 * 3 * 2 * 128 * 2  # sequence 0's rows are no longer held
        assert llama_cpp.llama_memory_seq_rm(m.mem, 1, 10, 20)  # a middle range (llama-server's context shift discards one)
        assert m.stats().n_tokens == 86
        assert llama_cpp.llama_memory_seq_pos_max(m.mem, 1) == 95
        assert m.decode([(1, 96, toks[0])]) == 0            # and it decodes on
        llama_cpp.llama_memory_clear(m.mem, True)
        assert m.stats().n_tokens == 0 and m.stats().bytes_held == 0
    finally:
        m.close()


def test_one_budget_holds_across_sequences(tiny_model):
    n_ctx, budget = 256, 3.0
    toks = _tokens(tiny_model, TEXT, 120)
    m = MultiSeq(tiny_model, f"rule@{budget:g}", n_seq=2, n_ctx=n_ctx, window=4)
    try:
        for i in range(0, 120, 8):
            assert m.decode([(k, i + j, toks[i + j]) for k in range(2) for j in range(8)]) == 0
            st = m.stats()
            assert st.bytes_held <= st.bytes_budget
        elems = 2 * 3 * 128   # the tiny model: K and V over 3 layers of 2 KV heads x 64
        assert st.bytes_budget == int(budget / 8 * n_ctx * elems)
        assert st.n_tokens == 240 and st.bits_per_elem <= budget + 0.6   # 240 of 256 tokens; the window costs more
    finally:
        m.close()


class StockSeq(MultiSeq):
    """The same driver over a stock llama.cpp cache (f16 K/V): what a kvq cache is compared with."""

    def __init__(self, model_path, n_ctx: int = 512, n_batch: int = 256):
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, 1
        cp.n_threads = cp.n_threads_batch = 2
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        assert self.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)


def _shifted(m: MultiSeq, toks: list[int]) -> np.ndarray:
    """Logits of 8 tokens decoded after a context shift (llama-server's: drop 8 after the first 4, move the rest back)."""
    try:
        assert llama_cpp.llama_memory_can_shift(m.mem)   # llama-server keeps --context-shift on
        assert m.decode([(0, j, t) for j, t in enumerate(toks[:32])]) == 0
        assert llama_cpp.llama_memory_seq_rm(m.mem, 0, 4, 12)
        llama_cpp.llama_memory_seq_add(m.mem, 0, 12, -1, -8)
        assert llama_cpp.llama_memory_seq_pos_max(m.mem, 0) == 23
        out = []
        for j in range(8):
            assert m.decode([(0, 24 + j, toks[32 + j])]) == 0
            out.append(m.logits(0))
        return np.array(out)
    finally:
        m.close()


def test_a_shift_moves_every_row_as_the_stock_cache_does(tiny_model):
    """seq_add re-encodes the moved K rows at their new positions: the kvq f16 cache after a shift gives
    the stock f16 cache's shifted logits (the tiny model's logits move by ~9 if positions are wrong)."""
    toks = _tokens(tiny_model, TEXT, 40)
    ref = _shifted(StockSeq(tiny_model), toks)
    got = _shifted(MultiSeq(tiny_model, "f16", n_seq=1), toks)
    unshifted = StockSeq(tiny_model)
    try:
        assert unshifted.decode([(0, j, t) for j, t in enumerate(toks[:40])]) == 0
        full = np.array([unshifted.logits(32 + j) for j in range(8)])
    finally:
        unshifted.close()
    assert np.abs(ref - full).max() > 1.0          # the shift matters on this model
    assert np.abs(got - ref).max() < 0.05


@pytest.mark.parametrize("spec", ["q4", "adaptive@3"])
def test_a_shift_on_quantized_pools_and_the_window(tiny_model, generic_controller, spec):
    """Quantized pools and the q8_0 window shift too (decode, RoPE, re-encode): the cache holds the
    shifted positions, each once, and decoding goes on."""
    toks = _tokens(tiny_model, TEXT, 40)
    kw = {"controller": generic_controller} if spec.startswith("adaptive") else {}
    m = MultiSeq(tiny_model, spec, n_seq=1, window=8 if spec.startswith("adaptive") else None, **kw)
    try:
        assert m.decode([(0, j, t) for j, t in enumerate(toks[:32])]) == 0
        assert llama_cpp.llama_memory_seq_rm(m.mem, 0, 4, 12)
        llama_cpp.llama_memory_seq_add(m.mem, 0, 12, -1, -8)
        k = np.zeros((64, 128), dtype=np.float32)
        v = np.zeros_like(k)
        pos, prec = np.zeros(64, dtype=np.int32), np.zeros(64, dtype=np.int32)
        f32, i32 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
        n = m.lib.llama_kvq_read_layer(m.ctx, 0, k.ctypes.data_as(f32), v.ctypes.data_as(f32),
                                       pos.ctypes.data_as(i32), prec.ctypes.data_as(i32), 64)
        assert sorted(pos[:n].tolist()) == list(range(24))
        if spec.startswith("adaptive"):
            assert set(prec[:n].tolist()) > {0}   # window rows and decided rows both moved
        assert m.decode([(0, 24, toks[32])]) == 0
        assert np.isfinite(m.logits(0)).all()
        assert m.stats().n_tokens == 25
    finally:
        m.close()
