"""Probe: single-thread time of kvq's attention kernel per decoded token (all layers) over a
filled cache, for each tile ISA, plus the cache's pool mix. The cache state is cached in /tmp.

    python scripts/experiments/attn_micro.py --kv adaptive@3.5 --ctx 8192 --data ../shared/data
"""
from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import numpy as np

from kvq_cli.models.registry import resolve
from kvq_cli.runtime import _lib as L
from kvq_cli.runtime._lib import kvq_lib
from kvq_cli.runtime.inspector import Inspector
from kvq_cli.runtime.kv import parse_kv
from kvq_cli.runtime.state import load_state, save_state

KERNELS = {"scalar": L.ATTN_FUSED_SCALAR, "avx2": 4, "avx512": 5}


def _p(a, t=ctypes.c_float):
    return a.ctypes.data_as(ctypes.POINTER(t))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", default="adaptive@3.5")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernels", default="avx2,avx512")
    a = ap.parse_args()
    model = resolve(None).path
    e = Inspector(model, kv=parse_kv(a.kv), n_ctx=a.ctx, n_threads=2)
    n = a.ctx - 64
    cache = Path(f"/tmp/attn_micro_{a.kv}_{a.ctx}.state")
    if cache.exists():
        load_state(e, cache)
    else:
        text = (Path(a.data) / "wikitext2" / "wiki.test.raw").read_text()
        e.llm.eval(e.tokenize(text)[:n])
        save_state(e, cache)
    d, lib, ctx = e.dims, kvq_lib(), e.llm.ctx
    rows = np.zeros(n + 256, np.int32)
    mix = {}
    for il in range(d.n_layer):
        k = np.zeros((n + 256, d.n_head_kv * d.head_dim), np.float32)
        v = np.zeros_like(k)
        pos = np.zeros(n + 256, np.int32)
        m = lib.llama_kvq_read_layer(ctx, il, _p(k), _p(v), _p(pos, ctypes.c_int32), _p(rows, ctypes.c_int32), n + 256)
        for b, c in zip(*np.unique(rows[:m], return_counts=True)):
            mix[int(b)] = mix.get(int(b), 0) + int(c)
    tot = sum(mix.values())
    names = {0: "window", 1: "f16", 2: "q8", 3: "q4", 4: "k4v2", 5: "q2"}
    print("rows per pool (share):", {names.get(b, b): round(c / tot, 3) for b, c in sorted(mix.items())})
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, d.n_head, d.head_dim)).astype(np.float32) * 2
    qpos = np.array([n], np.int32)
    out = np.zeros_like(q)
    for name in a.kernels.split(","):
        best = 1e9
        for _ in range(a.reps):
            t0 = time.perf_counter()
            for il in range(d.n_layer):
                rc = lib.llama_kvq_attend_kernel(ctx, KERNELS[name], il, _p(q), 1, _p(qpos, ctypes.c_int32), _p(out))
                assert rc == 0, lib.last_error()
            best = min(best, time.perf_counter() - t0)
        print(f"{name}: {best * 1e3:.2f} ms/token (1 thread, {d.n_layer} layers)  out[0,0,:3]={out[0, 0, :3]}")


if __name__ == "__main__":
    main()
