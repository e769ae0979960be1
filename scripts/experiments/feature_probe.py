"""Which decision-time features would close the gap between the learned controller and the oracle?

Calibration text only (tuning data). Decode regime as the shipped controller sees it (W = 32,
ubatches of 32, K centered with the shipped controller's centering).

1. Training rows: the first --chunks chunks of --chunk-len tokens, decoded by the oracle engine
   with every row at f16. Per decided (token, layer) row: the runtime's trace features, the
   damage at 2/4/8 bits (train.layer_damage), and candidate features computed here in NumPy from
   the recorded queries and the K rows:
     recv_max   log1p of the max over heads of the attention received in the window (relative to a uniform share)
     recv_far   log1p of the max over heads of the attention received from the window's second half
                (queries 17..32 positions later): local attention decays, persistent attention does not
     qbar_k     max over heads of scale * qbar_h . k, qbar_h the mean query of the layer's head h over the
                first two chunks (a stored per-layer vector, like the K centering)
     qbar_dk    log of the max over heads of (scale * qbar_h . dK)^2, dK the row's K error at 2 bits: the
                logit shift the mean query would see
     dv2        log of |dV|^2, the row's V error at 2 bits
     future     (non-causal ceiling, never available at decision time) log1p of the max over heads of the
                mean attention received from the queries after the window
2. An MLP damage regressor (train.fit_damage, the shipped objective) per feature set, held-out chunks
   last: mean true damage of its allocation at --budget bits vs the oracle's.
3. KL on held-out calibration text: --kl-chunks chunks of --kl-len tokens from token --kl-offset on.
   Each arm's predicted damage is allocated at --budget bits (rows of the final window at f16, as
   oracle@B does), installed with set_assignment, decoded, and scored against the all-f16 decode
   (KL of the second half). The oracle arm allocates the true damage. Allocation is global over the
   chunk (like oracle@B), not the runtime's online price, so arms are compared with each other only.

Usage: python scripts/feature_probe.py CALIB_TXT [--chunks 12] [--kl-chunks 4] [--budget 3] --json OUT
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.models.registry import embedded_path  # noqa: E402
from kvq_cli.runtime.inspector import Inspector  # noqa: E402
from kvq_cli.runtime.kv import KvqOptions  # noqa: E402
from kvq_cli.train.damage import EFF_BITS, engine_layer_damage
from kvq_cli.train.collect import MIN_FUTURE
from kvq_cli.train.oracle import ORACLE, allocate
from kvq_cli.train.fit import _forward, fit_damage
from probe_common import (add_kl_args, allocation_kl, chunk_log_probs, run, shipped_controller, shipped_damage,  # noqa: E402
                          with_f16, write_json)

W = 32
BASE = ["token_freq", "quality", "attn_var", "attn_entropy", "layer_frac", "k_absmax", "v_absmax", "attn_recv"]
NEW = ["recv_max", "recv_far", "qbar_k", "qbar_dk", "dv2"]
ARMS = {
    "base": BASE,
    "+recv_max": BASE + ["recv_max"],
    "+recv_far": BASE + ["recv_far"],
    "+qbar_k": BASE + ["qbar_k"],
    "+qbar_dk,dv2": BASE + ["qbar_dk", "dv2"],
    "+qbar_k,qbar_dk,dv2": BASE + ["qbar_k", "qbar_dk", "dv2"],
    "+all causal": BASE + NEW,
    "+future (ceiling)": BASE + ["future"],
}


def extra_features(q, qpos, k, kpos, qbar, n_head_kv, dk, dv):
    """[n_keys, 6]: recv_max, recv_far, qbar_k, qbar_dk, dv2, future (see the module doc)."""
    n_q, n_head, hd = q.shape
    group = n_head // n_head_kv
    scale = 1.0 / math.sqrt(hd)
    dist = qpos[:, None] - kpos[None, :]
    causal = dist >= 0
    win = (dist > 0) & (dist <= W)
    far = (dist > W // 2) & (dist <= W)
    fut = dist > W
    nwin, nfar, nfut = (np.maximum(m.sum(0), 1) for m in (win, far, fut))
    rel_n = (qpos + 1).astype(np.float64)[:, None]
    out = np.full((k.shape[0], 6), -np.inf)
    for h in range(n_head):
        g = h // group
        kg = k[:, g * hd:(g + 1) * hd]
        s = np.where(causal, q[:, h] @ kg.T * scale, -np.inf)
        s -= s.max(1, keepdims=True)
        a = np.exp(s)
        a /= a.sum(1, keepdims=True)
        rel = a * rel_n
        out[:, 0] = np.maximum(out[:, 0], (rel * win).sum(0) / nwin)
        out[:, 1] = np.maximum(out[:, 1], (rel * far).sum(0) / nfar)
        out[:, 2] = np.maximum(out[:, 2], kg @ qbar[h] * scale)
        out[:, 3] = np.maximum(out[:, 3], (dk[:, g * hd:(g + 1) * hd] @ qbar[h] * scale) ** 2)
        out[:, 5] = np.maximum(out[:, 5], (rel * fut).sum(0) / nfut)
    out[:, 4] = (dv * dv).sum(1)
    for j in (0, 1, 5):
        out[:, j] = np.log1p(out[:, j])
    out[:, 3] = np.log(out[:, 3] + 1e-12)
    out[:, 4] = np.log(out[:, 4] + 1e-12)
    return out


def chunk_rows(e, n_layer, n_head_kv, qbar, min_future):
    """Per decided (token, layer) row of the chunk just decoded: features by name, damage [n, 4], pos, layer."""
    tr = e.trace()
    feats, dmg, pos, lay = [], [], [], []
    for il in range(n_layer):
        d, n_later, kpos = engine_layer_damage(e, il, W)
        q, qpos = e.queries(il)
        k, v, kpos2, _ = e.read_layer(il)
        assert np.array_equal(kpos, kpos2)
        ex = extra_features(q, qpos, k, kpos, qbar[il], n_head_kv, e.roundtrip(2, k) - k, e.roundtrip(2, v) - v)
        rows = np.flatnonzero(tr.layer == il)
        at = {int(p): i for i, p in enumerate(kpos)}
        idx = np.array([at[int(p)] for p in tr.pos[rows]], dtype=np.int64)
        keep = n_later[idx] >= min_future
        rows, idx = rows[keep], idx[keep]
        f = {n: tr.features[rows, tr.names.index(n)].astype(np.float64) for n in BASE}
        for j, n in enumerate(NEW + ["future"]):
            f[n] = ex[idx, j]
        feats.append(f)
        dmg.append(np.concatenate([d[idx], np.zeros((len(idx), 1))], 1))
        pos.append(tr.pos[rows])
        lay.append(np.full(len(rows), il))
    names = list(feats[0])
    return ({n: np.concatenate([f[n] for f in feats]) for n in names}, np.concatenate(dmg), np.concatenate(pos),
            np.concatenate(lay))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--chunk-len", type=int, default=1024)
    add_kl_args(ap, kl_chunks=4)
    a = ap.parse_args()
    t0 = time.time()
    spec = shipped_controller()
    k_center = np.array(spec.k_center, np.float32)
    model = embedded_path()
    text = Path(a.calib).read_text(encoding="utf-8")
    n_ctx = max(a.chunk_len, a.kl_len)
    opts = KvqOptions(window=W, trace=True, per_layer=True, record_q=True)
    out: dict = {"command": " ".join(["python", "scripts/feature_probe.py"] + sys.argv[1:]), "budget": a.budget,
                 "window": W, "arms": {n: f for n, f in ARMS.items()}}
    with Inspector(model, kv=ORACLE, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=32, kvq=opts) as e:
        e.set_k_center(k_center)
        d = e.dims
        toks = e.tokenize(text)
        bos = e.llm.token_bos()
        per = a.chunk_len - 1
        chunks = [[bos] + toks[i * per:(i + 1) * per] for i in range(a.chunks)]
        # the mean query per layer and head over the first two chunks
        qsum = np.zeros((d.n_layer, d.n_head, d.head_dim))
        nq = 0
        for c in chunks[:2]:
            e.set_assignment(np.zeros(0, np.int32))
            e.clear_trace()
            e.decode(c, 0)
            for il in range(d.n_layer):
                q, _ = e.queries(il)
                qsum[il] += q.sum(0)
            nq += len(c)
        qbar = qsum / nq
        parts = []
        for ci, c in enumerate(chunks):
            e.set_assignment(np.zeros(0, np.int32))
            e.clear_trace()
            e.decode(c, 0)
            f, dm, pos, lay = chunk_rows(e, d.n_layer, d.n_head_kv, qbar, MIN_FUTURE)
            parts.append((f, dm, np.full(len(dm), ci)))
            print(f"train chunk {ci + 1}/{len(chunks)} {len(dm)} rows {time.time() - t0:.0f}s", flush=True)
        feats = {n: np.concatenate([p[0][n] for p in parts]) for n in parts[0][0]}
        dmg = np.concatenate([p[1] for p in parts])
        chunk = np.concatenate([p[2] for p in parts])
        val = chunk >= a.chunks - 2
        scale = float(dmg[~val, 0].mean())
        models = {}
        proxy = {}
        oracle_cls = allocate(dmg[val], a.budget)
        proxy["oracle"] = float(dmg[val][np.arange(val.sum()), oracle_cls].mean())
        for arm, names in ARMS.items():
            x = np.stack([feats[n] for n in names], 1)
            reg, mean, std, ep = fit_damage(x, dmg[:, :3] / scale, val, seed=0)
            models[arm] = (names, reg, mean, std)
            pred = _forward(reg, (x[val] - mean) / std)[2]
            cls = allocate(with_f16(pred), a.budget)
            proxy[arm] = float(dmg[val][np.arange(val.sum()), cls].mean())
            print(f"{arm:20s} held-out damage at {a.budget} bits {proxy[arm]:.3e} (epochs {ep})", flush=True)
        print(f"{'oracle':20s} held-out damage at {a.budget} bits {proxy['oracle']:.3e}", flush=True)
        out["proxy_damage"] = proxy
        out["n_train_rows"] = int((~val).sum())
        out["n_val_rows"] = int(val.sum())
        # KL on held-out calibration text
        per = a.kl_len - 1
        kl_chunks = [[bos] + toks[a.kl_offset + i * per:a.kl_offset + (i + 1) * per] for i in range(a.kl_chunks)]
        kl = {arm: [] for arm in ["oracle", "shipped"] + list(ARMS)}
        bits_seen = {arm: [] for arm in kl}
        for ci, c in enumerate(kl_chunks):
            c = c[:-1] if len(c) > a.kl_len - 1 else c
            half = len(c) // 2
            e.set_assignment(np.zeros(0, np.int32))
            ref_lp = chunk_log_probs(e, c, half)
            f, dm, pos, lay = chunk_rows(e, d.n_layer, d.n_head_kv, qbar, 0)
            n = len(c)
            decided = n - W
            per_row = (a.budget * n - EFF_BITS[-1] * W) / decided
            sel = pos < decided
            preds = {"oracle": dm[sel]}
            z = {n_: np.asarray(v)[sel] for n_, v in f.items()}
            preds["shipped"] = shipped_damage(spec, np.stack([z[n_] for n_ in spec.features], 1))
            for arm, (names, reg, mean, std) in models.items():
                x = np.stack([z[n_] for n_ in names], 1)
                preds[arm] = with_f16(_forward(reg, (x - mean) / std)[2])
            for arm, pr in preds.items():
                k_, b_ = allocation_kl(e, c, half, ref_lp, pr, pos[sel], lay[sel], per_row, d.n_layer)
                kl[arm].append(k_)
                bits_seen[arm].append(b_)
            print(f"kl chunk {ci + 1}/{len(kl_chunks)} " + " ".join(f"{k_}={v[-1]:.4f}" for k_, v in kl.items())
                  + f" {time.time() - t0:.0f}s", flush=True)
        out["kl"] = {arm: {"mean": float(np.mean(v)), "chunks": v, "bits": bits_seen[arm]} for arm, v in kl.items()}
        out["seconds"] = time.time() - t0
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
