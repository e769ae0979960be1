"""Inspector: research access to a kvq cache (training oracle, probes, tests).

The product path (chat, bench, eval of static/rule/adaptive caches) needs only Engine. What
training and the tests need besides, and what no user command calls directly, lives here:
the decision trace with its features, recorded queries, rows read back as stored, round trips
of rows through a pool's format, an installed oracle assignment, and K centering set by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvq_cli.runtime.engine import Engine


@dataclass(frozen=True)
class KvqTrace:
    """Recorded decisions: one row per token (layer -1) or per token and layer."""

    pos: Any
    layer: Any
    token: Any
    bits: Any
    features: Any        # [n, n_features], columns named by `names` (runtime order)
    names: list[str]


def _ptr(a):
    """ctypes pointer to a contiguous float32 / int32 NumPy array."""
    import ctypes

    import numpy as np

    ctype = ctypes.c_float if a.dtype == np.float32 else ctypes.c_int32
    assert a.flags.c_contiguous and a.dtype in (np.float32, np.int32)
    return a.ctypes.data_as(ctypes.POINTER(ctype))


class Inspector(Engine):
    """An Engine with the kvq cache's research hooks (needs a kvq policy, not a stock cache)."""

    def trace(self) -> "KvqTrace":
        """Every precision decision recorded so far (KvqOptions(trace=True)), with its features."""
        import numpy as np

        lib, ctx = self._kvq(), self.llm.ctx
        n = self._check(lib.llama_kvq_get_trace(ctx, None, None, None, None, None, 0), "trace")
        names = lib.feature_names()
        pos, layer, tok, bits = (np.zeros(n, np.int32) for _ in range(4))
        feat = np.zeros((n, len(names)), np.float32)
        lib.llama_kvq_get_trace(ctx, _ptr(pos), _ptr(layer), _ptr(tok), _ptr(bits), _ptr(feat), n)
        return KvqTrace(pos=pos, layer=layer, token=tok, bits=bits, features=feat, names=names)

    def clear_trace(self) -> None:
        """Forget the recorded decisions and queries."""
        self._kvq().llama_kvq_clear_trace(self.llm.ctx)

    def queries(self, il: int):
        """(q [n, n_head, head_dim], positions [n]) that layer il's attention saw (KvqOptions(record_q=True))."""
        import numpy as np

        lib, ctx, d = self._kvq(), self.llm.ctx, self.dims
        n = self._check(lib.llama_kvq_get_queries(ctx, il, None, None, 0), "queries")
        q = np.zeros((n, d.n_head, d.head_dim), np.float32)
        pos = np.zeros(n, np.int32)
        lib.llama_kvq_get_queries(ctx, il, _ptr(q), _ptr(pos), n)
        return q, pos

    def read_layer(self, il: int):
        """(K, V [n, n_embd_kv] as stored then decoded, positions [n], class [n]) held for layer il."""
        import numpy as np

        lib, ctx = self._kvq(), self.llm.ctx
        n = self._check(lib.llama_kvq_read_layer(ctx, il, None, None, None, None, 0), "read_layer")
        m = self.dims.n_head_kv * self.dims.head_dim
        k, v = np.zeros((n, m), np.float32), np.zeros((n, m), np.float32)
        pos, prec = np.zeros(n, np.int32), np.zeros(n, np.int32)
        lib.llama_kvq_read_layer(ctx, il, _ptr(k), _ptr(v), _ptr(pos), _ptr(prec), n)
        return k, v, pos, prec

    def roundtrip(self, bits: int, x, u=None, v: bool = False):
        """Rows x [n, n_embd_kv] stored at `bits` as a pool stores K rows, decoded back. With v, as it stores
        V rows (with unbiased block scales where this engine has KvqOptions.v_unbias on; otherwise the
        same). With u (same shape: per row the window queries' direction, sum of p^2 q per KV head), K rows
        rounded query-aware as they leave the window (KvqOptions.qar_mu > 0, 2 and 4 bits; otherwise plain)."""
        import numpy as np

        x = np.ascontiguousarray(x, np.float32)
        y = np.empty_like(x)
        if u is None:
            fn = self._kvq().llama_kvq_roundtrip_v if v else self._kvq().llama_kvq_roundtrip
            self._check(fn(self.llm.ctx, int(bits), _ptr(x), _ptr(y), len(x)), "roundtrip")
            return y
        if v:
            raise ValueError("query-aware rounding is for K rows")
        u = np.ascontiguousarray(u, np.float32)
        if u.shape != x.shape:
            raise ValueError(f"u has shape {u.shape}, x {x.shape}")
        self._check(self._kvq().llama_kvq_roundtrip_qar(self.llm.ctx, int(bits), _ptr(x), _ptr(u), _ptr(y), len(x)),
                    "roundtrip")
        return y

    def set_assignment(self, bits) -> None:
        """Oracle policy: bits per position (or per position x layer with per_layer)."""
        import numpy as np

        b = np.ascontiguousarray(bits, np.int32)
        self._check(self._kvq().llama_kvq_set_assignment(self.llm.ctx, _ptr(b), len(b)), "assignment")

    def _set_layer_vectors(self, fn, x, what: str) -> None:
        """Pass per-layer vectors [n_layer, n_embd_kv] (None: clear) to a llama_kvq_set_* function."""
        import numpy as np

        if x is None:
            self._check(fn(self.llm.ctx, None, 0), what)
            return
        m = np.ascontiguousarray(x, np.float32).reshape(-1)
        self._check(fn(self.llm.ctx, _ptr(m), len(m)), what)

    def set_k_center(self, k_mu) -> None:
        """K centering vectors [n_layer, n_embd_kv] (None: none); before the first decode."""
        self._set_layer_vectors(self._kvq().llama_kvq_set_k_center, k_mu, "K centering")
