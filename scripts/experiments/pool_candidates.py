"""Which new precision pool would lower the oracle's damage at a bit budget? (issue 7, 3-bit bar)

    .venv/bin/python scripts/pool_candidates.py CALIB.txt [--chunks 4] [--json OUT]

Decodes calibration chunks with the oracle engine (every row f16, W = 32, 32-token ubatches, as
`kvq train --regime decode` does), and measures each (token, layer) row's first-order damage
(kvq_cli.train.layer_damage) for candidate pools that store K and V at different precisions:

- K2V2, K4V4, K8V8: the runtime's pools (llama_kvq_roundtrip), 2.25 / 4.5 / 8.5 bits/element
  (kvq2 was 2.5 bits until 2026-12-04: results/pool_candidates*.txt were measured with that layout).
- K4V2, K2V4: K of one runtime pool with V of another (3.375 bits): no new quantizer needed.
- K2V16, K16V2: one side at 2 bits, the other exact: how the damage splits between K and V.
- K3V3, K3V2: a *simulated* 3-bit type (NumPy here, not in the runtime): the runtime's Hadamard
  rotation per 64 values, then per 64-value block an f16 minimum and step and 3-bit codes
  (3.5 bits/element), clipping range searched for the lowest squared error.
- S2, S3, S4 (`--lean`): *simulated* lower-overhead types: the same rotation, then per 64-value
  block one f16 scale d and symmetric codes (c + 1/2 - 2^(b-1)) d (no minimum: the rows are
  centered), 2.25 / 3.25 / 4.25 bits/element instead of the 2.5-bit kvq2 of then and q4_0's 4.5; d searched
  for the lowest squared error. Sets of lean pools ask whether the bits saved on block scales
  buy more than the extra rounding error costs.

`--k-center` stores K centered by its mean per layer over the chunks, as rule/adaptive caches
do (kvq_cli.train.k_center_of). `--budgets` takes the bits of the decided rows; a cache of C
tokens with an f16 window of W at B bits overall leaves (B C - 16 W) / (C - W) for them
(2.79 at B = 3, C = 2048, W = 32, the wikitext-2 Pareto rows).

For each set of pools and budget it reports the oracle's allocation (argmin damage + lambda *
bits over the rows, lambda bisected to the budget: kvq_cli.train.allocate) and its mean
damage relative to the runtime's current pools. First-order damage on calibration text, not KL:
a ratio here says how much room a pool gives the oracle, not what a controller will reach.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.models.registry import embedded_path  # noqa: E402
from kvq_cli.runtime.inspector import Inspector  # noqa: E402
from kvq_cli.runtime.kv import KvqOptions  # noqa: E402
from kvq_cli.errors import KvqError  # noqa: E402
from kvq_cli.train.damage import EFF_BITS, layer_damage, roundtrip_deltas
from kvq_cli.train.oracle import ORACLE, allocate
from kvq_cli.train.collect import calibration_chunks, k_center_of

WINDOW, MIN_FUTURE = 32, 32
# bits/element of a (K, V) pair: the mean of its sides' bits; a runtime type's from EFF_BITS
_SIDE = {2: float(EFF_BITS[0]), 3: 3.5, 4: float(EFF_BITS[1]), 8: float(EFF_BITS[2]), 16: float(EFF_BITS[3]),
         "s2": 2.25, "s3": 3.25, "s4": 4.25}
_PAIRS = {"K2V2": (2, 2), "K4V4": (4, 4), "K8V8": (8, 8), "F16": (16, 16), "K4V2": (4, 2), "K2V4": (2, 4),
          "K3V3": (3, 3), "K3V2": (3, 2), "K2V16": (2, 16), "K16V2": (16, 2),
          "S2": ("s2", "s2"), "S3": ("s3", "s3"), "S4": ("s4", "s4"), "S3S2": ("s3", "s2"), "S4S2": ("s4", "s2")}
LEAN = {"S2", "S3", "S4", "S3S2", "S4S2"}
COST = {n: (_SIDE[kb] + _SIDE[vb]) / 2 for n, (kb, vb) in _PAIRS.items()}
CURRENT = ["K2V2", "K4V4", "K8V8", "F16"]
SETS = {
    "current (2/4/8/16)": CURRENT,
    "+ K4V2": CURRENT + ["K4V2"],
    "+ K2V4": CURRENT + ["K2V4"],
    "+ K3V3 (sim.)": CURRENT + ["K3V3"],
    "+ K3V2 (sim.)": CURRENT + ["K3V2"],
    "+ K4V2, K3V3": CURRENT + ["K4V2", "K3V3"],
    "+ K4V2, K3V3, K3V2": CURRENT + ["K4V2", "K3V3", "K3V2"],
}
LEAN_SETS = {
    "lean S2/S4/8/16": ["S2", "S4", "K8V8", "F16"],
    "lean + S3": ["S2", "S3", "S4", "K8V8", "F16"],
    "lean + S3, S3S2, S4S2": ["S2", "S3", "S4", "K8V8", "F16", "S3S2", "S4S2"],
    "S2 + current 4/8/16": ["S2", "K4V4", "K8V8", "F16"],
}
BUDGETS = (3.0, 3.5, 4.0, 5.0)


def _hadamard64() -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < 64:
        h = np.block([[h, h], [h, -h]])
    return h / 8.0   # normalised: symmetric, orthogonal, self-inverse


H64 = _hadamard64()


def q3_sim(x: np.ndarray, blk: int = 64) -> np.ndarray:
    """x [n, d] through the simulated 3-bit pool: rotate, quantize per block, dequantize, rotate back."""
    n, d = x.shape
    r = (x.reshape(n, -1, 64) @ H64).reshape(-1, blk)
    mn, mx = r.min(1, keepdims=True), r.max(1, keepdims=True)
    best, best_err = r, np.full((len(r), 1), np.inf)
    for lo_f in np.linspace(0, 0.15, 7):
        for hi_f in np.linspace(0, 0.15, 7):
            lo = (mn + (mx - mn) * lo_f).astype(np.float16).astype(np.float64)
            step = ((mx - (mx - mn) * hi_f - lo) / 7).astype(np.float16).astype(np.float64)
            step[step == 0] = 1.0
            y = np.clip(np.round((r - lo) / step), 0, 7) * step + lo
            err = ((y - r) ** 2).sum(1, keepdims=True)
            better = err < best_err
            best, best_err = np.where(better, y, best), np.where(better, err, best_err)
    return (best.reshape(n, -1, 64) @ H64).reshape(n, d).astype(np.float32)


def sym_sim(x: np.ndarray, bits: int) -> np.ndarray:
    """x [n, d] through a simulated lean pool: rotate, per 64-value block an f16 scale d and codes
    c in [0, 2^bits) decoding to (c + 1/2 - 2^(bits-1)) d, d searched; dequantize, rotate back."""
    n, d = x.shape
    r = (x.reshape(n, -1, 64) @ H64).reshape(-1, 64)
    half = 2 ** (bits - 1)
    amax = np.abs(r).max(1, keepdims=True)
    best, best_err = r, np.full((len(r), 1), np.inf)
    for f in np.linspace(0.3 if bits == 2 else 0.5, 1.0, 36):
        step = (amax * f / (half - 0.5)).astype(np.float16).astype(np.float64)
        step[step == 0] = 1.0
        y = (np.clip(np.floor(r / step) + half, 0, 2 * half - 1) - half + 0.5) * step
        err = ((y - r) ** 2).sum(1, keepdims=True)
        better = err < best_err
        best, best_err = np.where(better, y, best), np.where(better, err, best_err)
    return (best.reshape(n, -1, 64) @ H64).reshape(n, d).astype(np.float32)


def collect(calib: str, n_chunks: int, lean: bool = False,
            center: bool = False) -> tuple[np.ndarray, list[str], float, dict[str, float]]:
    """Damage [rows, candidates] of the decided rows of n_chunks calibration chunks; names; 3-bit nmse;
    the lean types' nmse."""
    text = Path(calib).read_text(encoding="utf-8")
    names = [n for n in COST if n != "F16" and (lean or n not in LEAN)]
    opts = KvqOptions(window=WINDOW, trace=True, per_layer=True, record_q=True)
    out, err, ref = [], 0.0, 0.0
    lean_err = {b: 0.0 for b in (2, 3, 4)}
    with Inspector(embedded_path(), kv=ORACLE, n_ctx=1024, n_batch=1024, n_ubatch=32, kvq=opts) as e:
        chunks = calibration_chunks(e, text, 1024, n_chunks)
        if center:
            e.set_k_center(k_center_of(embedded_path(), chunks))
        for ci, chunk in enumerate(chunks):
            e.clear_trace()
            e.decode(chunk, 0)
            for il in range(e.dims.n_layer):
                q, qpos = e.queries(il)
                k, v, kpos, _ = e.read_layer(il)
                d = dict(zip((2, 4, 8), zip(roundtrip_deltas(e, k), roundtrip_deltas(e, v))))
                k3, v3 = q3_sim(k) - k, q3_sim(v) - v
                err += float((k3 ** 2).sum() + (v3 ** 2).sum())
                ref += float((k ** 2).sum() + (v ** 2).sum())
                zero = np.zeros_like(k)
                cand = {"K2V2": d[2], "K4V4": d[4], "K8V8": d[8], "K4V2": (d[4][0], d[2][1]),
                        "K2V4": (d[2][0], d[4][1]), "K3V3": (k3, v3), "K3V2": (k3, d[2][1]),
                        "K2V16": (d[2][0], zero), "K16V2": (zero, d[2][1])}
                if lean:
                    sd = {b: (sym_sim(k, b) - k, sym_sim(v, b) - v) for b in (2, 3, 4)}
                    for b in sd:
                        lean_err[b] += float((sd[b][0] ** 2).sum() + (sd[b][1] ** 2).sum())
                    cand.update({"S2": sd[2], "S3": sd[3], "S4": sd[4], "S3S2": (sd[3][0], sd[2][1]),
                                 "S4S2": (sd[4][0], sd[2][1])})
                dmg, n_later = layer_damage(q, qpos, k, v, kpos, [cand[n][0] for n in names],
                                            [cand[n][1] for n in names], WINDOW)
                out.append(dmg[n_later >= MIN_FUTURE])
            print(f"chunk {ci + 1}/{n_chunks}: {sum(len(o) for o in out)} rows", file=sys.stderr, flush=True)
    return np.concatenate(out), names, err / ref, {f"s{b}": v / ref for b, v in lean_err.items() if lean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("calib")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("--lean", action="store_true", help="add the simulated lean types S2/S3/S4")
    ap.add_argument("--k-center", action="store_true", help="store K centered, as rule/adaptive caches do")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                    help="comma-separated bits of the decided rows")
    a = ap.parse_args()
    try:
        budgets = tuple(float(b) for b in a.budgets.split(","))
    except ValueError:
        sys.exit(f"error: --budgets must be comma-separated numbers (got {a.budgets!r})")
    if not os.path.isfile(a.calib):
        sys.exit(f"error: no calibration file {a.calib}")
    if a.chunks < 1:
        sys.exit(f"error: --chunks must be at least 1 (got {a.chunks})")
    try:
        D, names, nmse3, lean_nmse = collect(a.calib, a.chunks, a.lean, a.k_center)
    except (KvqError, UnicodeDecodeError) as e:
        sys.exit(f"error: {e.one_line() if isinstance(e, KvqError) else e}")
    if not len(D):
        sys.exit("error: no calibration row was seen by enough later queries: the text is too short")
    col = {n: D[:, i] for i, n in enumerate(names)}
    col["F16"] = np.zeros(len(D))
    res = {"command": " ".join(["python scripts/pool_candidates.py"] + sys.argv[1:]), "rows": len(D),
           "sim_3bit_nmse": nmse3, "lean_nmse": lean_nmse, "k_center": a.k_center, "mean_damage": {n: float(col[n].mean()) for n in names}, "sets": {}}
    print(f"{len(D)} (token, layer) rows; simulated 3-bit nmse {nmse3:.4f} (kvq2 ~0.10, q4_0 ~0.0074)")
    if lean_nmse:
        print("lean types' nmse: " + ", ".join(f"{n} {v:.4f}" for n, v in lean_nmse.items()))
    print(f"damage with one side at 2 bits, the other exact: K {col['K2V16'].mean():.2e}, V {col['K16V2'].mean():.2e}"
          f" ({col['K2V16'].mean() / col['K16V2'].mean():.1f}x)")
    print("oracle damage at each budget, relative to the current pools (pool mix in brackets):")
    cur_dm, cur_cost = np.stack([col[p] for p in CURRENT], 1), np.array([COST[p] for p in CURRENT])
    cur = {b: cur_dm[np.arange(len(D)), allocate(cur_dm, b, cur_cost)].mean() for b in budgets}
    for name, pools in (SETS | LEAN_SETS if a.lean else SETS).items():
        dm = np.stack([col[p] for p in pools], 1)
        cost = np.array([COST[p] for p in pools])
        row = {}
        for b in budgets:
            cls = allocate(dm, b, cost)
            mean = dm[np.arange(len(D)), cls].mean()
            frac = np.bincount(cls, minlength=len(pools)) / len(cls)
            row[str(b)] = {"damage": float(mean), "ratio": float(mean / cur[b]), "bits": float(cost[cls].mean()),
                           "mix": {p: round(float(f), 3) for p, f in zip(pools, frac)}}
        res["sets"][name] = row
        b0 = str(budgets[0])
        print(f"  {name:22s} " + "  ".join(f"@{b}: {row[str(b)]['ratio']:.2f}x" for b in budgets)
              + f"   [@{b0}: " + " ".join(f"{p} {f:.2f}" for p, f in row[b0]["mix"].items() if f > 0) + "]")
    if a.json:
        tmp = a.json + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(res, f, indent=1)
            os.replace(tmp, a.json)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            sys.exit(f"error: cannot write {a.json}: {e.strerror}")


if __name__ == "__main__":
    main()
