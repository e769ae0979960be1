"""Which regression target makes the controller's allocation closest to the oracle's?

Calibration text only (tuning data). The shipped controller regresses each row's damage at 2/4/8
bits with a squared error, which the heaviest rows dominate: on held-out calibration rows 2% of
the rows carry most of the 2-bit damage. This fits the same MLP (features, hidden units, seed,
early stopping: train.fit_damage) on the training rows of `kvq train` (its --cache, both regimes,
K centered as shipped) to other targets, and compares, at --budget bits:
  damage   the shipped objective (train.train(objective="damage"), the shipped controller's weights)
  sqrt     sqrt(damage); predicted damage = max(out, 0)^2
  log      log(damage + floor); predicted damage = exp(out)
  logc     the log fit with a lognormal mean: exp(out + s2 / 2), s2 the training rows' residual
           variance per precision
  ARM+layer  ARM's prediction times a factor per (layer, precision): the training rows' mean true
           damage over their mean predicted damage in that layer (a per-layer calibration the
           runtime could store like the K centering)
1. held-out rows (the cache's held-out chunks and prompts): mean true damage of each arm's allocation;
2. KL on held-out calibration text (--kl-chunks chunks of --kl-len tokens from token --kl-offset):
   each arm's predicted damage of every decided (token, layer) row of a decode behind the f16
   window (W = 32, ubatches of 32, trace features) is allocated at --budget bits (the final
   window at f16, as oracle@B does), installed with set_assignment, decoded and scored against
   the all-f16 decode (KL of the second half); the oracle arm allocates the true damage. The
   allocation is global over the chunk (like oracle@B), not the runtime's online price.

Usage: python scripts/objective_probe.py CALIB_TXT --cache KVQ_HOME/calib-oracle.npz --json OUT
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.models.registry import embedded_path  # noqa: E402
from kvq_cli.runtime.inspector import Inspector  # noqa: E402
from kvq_cli.runtime.kv import KvqOptions  # noqa: E402
from kvq_cli.train.damage import EFF_BITS, engine_layer_damage
from kvq_cli.train.oracle import ORACLE, allocate
from kvq_cli.train.fit import _forward, fit_damage, train
from kvq_cli.train.collect import calibration_data
from probe_common import (add_kl_args, allocation_kl, f16_reference, held_out_chunks, run, shipped_damage,  # noqa: E402
                          with_f16, write_json)

W = 32
FLOOR = 1e-6   # log arm: floor of the damage relative to the mean 2-bit damage
_LAYER_OF = [None]   # the layer of each row being predicted (set before each prediction)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    ap.add_argument("--cache", required=True)
    add_kl_args(ap, kl_chunks=4)
    ap.add_argument("--arms", default="damage,sqrt,log")
    a = ap.parse_args()
    t0 = time.time()
    model = embedded_path()
    text = Path(a.calib).read_text(encoding="utf-8", errors="replace")
    data, n_held = calibration_data(model, text, regime="both", cache=Path(a.cache), n_chunks=12, n_prompts=512,
                                    chunk_len=1024, window=W)
    names = ["token_freq", "quality", "attn_var", "attn_entropy", "layer_frac", "k_absmax", "v_absmax", "attn_recv"]
    x = data.features[:, [data.names.index(n) for n in names]].astype(np.float64)
    chunks = np.unique(data.chunk)
    val = np.isin(data.chunk, chunks[-n_held:])
    scale = float(data.damage[~val, 0].mean())
    dmg = data.damage[:, :3] / scale
    arms = a.arms.split(",")
    predict = {}
    fits = {}
    for arm in arms:
        if arm == "damage":
            spec, _ = train(data, budget=3.5, per_layer=True, val_chunks=n_held, objective="damage", features=names)
            predict[arm] = (lambda xx, spec=spec: shipped_damage(spec, xx)[:, :3])
            continue
        if arm.endswith("+layer"):
            inner = predict[arm[:-len("+layer")]]
            p, tr = inner(x[~val]), ~val
            fac = np.ones((data.n_layer, 3))
            for il in range(data.n_layer):
                m_ = data.layer[tr] == il
                fac[il] = dmg[tr][m_].mean(0) / np.maximum(p[m_].mean(0), 1e-30)
            predict[arm] = (lambda xx, inner=inner, fac=fac: inner(xx) * fac[_LAYER_OF[0]])
            continue
        if arm == "logc":
            reg, m, s, ep = fits.get("log") or fit_damage(x, np.log(dmg + FLOOR), val)
            res = _forward(reg, (x[~val] - m) / s)[2] - np.log(dmg[~val] + FLOOR)
            s2 = res.var(0)
            predict[arm] = (lambda xx, reg=reg, m=m, s=s, s2=s2: np.exp(_forward(reg, (xx - m) / s)[2] + s2 / 2))
            continue
        target = {"sqrt": np.sqrt(dmg), "log": np.log(dmg + FLOOR)}[arm]
        reg, m, s, ep = fits[arm] = fit_damage(x, target, val)
        post = {"sqrt": lambda o: np.maximum(o, 0) ** 2, "log": np.exp}[arm]
        predict[arm] = (lambda xx, reg=reg, m=m, s=s, post=post: post(_forward(reg, (xx - m) / s)[2]))
        print(f"fit {arm}: {ep} epochs {time.time() - t0:.0f}s", flush=True)
    out: dict = {"command": " ".join(["python", "scripts/objective_probe.py"] + sys.argv[1:]), "budget": a.budget,
                 "features": names, "n_train_rows": int((~val).sum()), "n_val_rows": int(val.sum())}
    dv = data.damage[val]
    rows = np.arange(len(dv))
    proxy = {"oracle": float(dv[rows, allocate(dv, a.budget)].mean())}
    for arm, f in predict.items():
        _LAYER_OF[0] = data.layer[val]
        p = f(x[val])
        proxy[arm] = float(dv[rows, allocate(with_f16(p), a.budget)].mean())
    out["proxy_damage"] = proxy
    print("held-out damage at", a.budget, "bits:", {k: f"{v:.3e}" for k, v in proxy.items()}, flush=True)
    opts = KvqOptions(window=W, trace=True, per_layer=True, record_q=True)
    kl = {arm: [] for arm in ["oracle"] + arms}
    bits_seen = {arm: [] for arm in kl}
    with Inspector(model, kv=ORACLE, n_ctx=a.kl_len, n_batch=a.kl_len, n_ubatch=32, kvq=opts) as e:
        e.set_k_center(data.k_center)
        d = e.dims
        for ci, c in enumerate(held_out_chunks(e, text, a)):
            half = len(c) // 2
            ref_lp = f16_reference(e, c)
            tr = e.trace()
            n = len(c)
            decided = n - W
            sel = tr.pos < decided
            pos, lay = tr.pos[sel], tr.layer[sel]
            xs = tr.features[sel][:, [tr.names.index(nm) for nm in names]].astype(np.float64)
            true = np.zeros((len(pos), 4))
            for il in range(d.n_layer):
                dm, _, kpos = engine_layer_damage(e, il, W)
                at = {int(p_): i for i, p_ in enumerate(kpos)}
                m_ = lay == il
                true[m_, :3] = dm[[at[int(p_)] for p_ in pos[m_]]]
            preds = {"oracle": true}
            for arm, f in predict.items():
                _LAYER_OF[0] = lay
                preds[arm] = with_f16(f(xs))
            per_row = (a.budget * n - EFF_BITS[-1] * W) / decided
            for arm, pr in preds.items():
                k_, b_ = allocation_kl(e, c, half, ref_lp, pr, pos, lay, per_row, d.n_layer)
                kl[arm].append(k_)
                bits_seen[arm].append(b_)
            print(f"kl chunk {ci + 1}/{a.kl_chunks} " + " ".join(f"{k_}={v[-1]:.4f}" for k_, v in kl.items())
                  + f" {time.time() - t0:.0f}s", flush=True)
    out["kl"] = {arm: {"mean": float(np.mean(v)), "chunks": v, "bits": bits_seen[arm]} for arm, v in kl.items()}
    out["seconds"] = time.time() - t0
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
