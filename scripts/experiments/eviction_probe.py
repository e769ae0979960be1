"""How much could leaving rows out (0 bits: eviction per token and layer) buy the oracle?

Calibration text only (tuning data). On each held-out calibration chunk (--kl-chunks chunks of
--kl-len tokens from --kl-offset, the chunks of window_probe.py), the all-f16 decode with the q8_0
window of W = 128 that the Pareto rows use gives every decided row's first-order damage with the
queries after its window (`layer_damage`) at 2, 4 and 8 bits and when left out (`drop=True`). The
rows are allocated globally at each budget (the final window at q8_0, as oracle@B) over the pools
2/4/8/16 and over 0/2/4/8/16, and for each allocation the probe reports its total first-order
damage, the share of rows at each precision, and the KL of the chunk's second half vs the all-f16
decode with the allocation installed (probe_common.allocation_kl; the runtime leaves bits-0 rows out).

Usage: python scripts/eviction_probe.py CALIB_TXT --json OUT [--kl-chunks 4] [--budgets 2.5,3,3.5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.runtime.kv import KvqOptions  # noqa: E402
from kvq_cli.controller.spec import EFF_BITS_OF  # noqa: E402
from kvq_cli.train.oracle import allocate  # noqa: E402
from kvq_cli.train.damage import costs_of, decided_damage  # noqa: E402
from probe_common import add_kl_args, allocation_kl, oracle_refs, run, shipped_controller, write_json  # noqa: E402

W = 128
MENUS = {"2/4/8/16": (1, 2, 3, 4), "0/2/4/8/16": (0, 1, 2, 3, 4)}   # columns of the [drop, 2, 4, 8, 16] damage
BITS = (0, 2, 4, 8, 16)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    add_kl_args(ap, kl_chunks=4)
    ap.add_argument("--budgets", default="2.5,3,3.5")
    a = ap.parse_args()
    budgets = [float(b) for b in a.budgets.split(",")]
    t0 = time.time()
    spec = shipped_controller()
    text = Path(a.calib).read_text(encoding="utf-8", errors="replace")
    costs_all = costs_of(BITS)
    res: dict[str, dict] = {}
    opts = KvqOptions(window=W, window_bits=8, per_layer=True, record_q=True)
    for e, ci, c, ref_lp in oracle_refs(text, a, opts, spec.k_center):
        n, half, n_layer = len(c), len(c) // 2, e.dims.n_layer
        d, pos, lay = decided_damage(e, n, W, BITS)   # drop, 2, 4, 8
        full = np.concatenate([d, np.zeros((len(d), 1))], 1)   # drop, 2, 4, 8, 16
        for b in budgets:
            per_row = (b * n - EFF_BITS_OF[8] * W) / (n - W)
            for name, cols in MENUS.items():
                cls = allocate(full[:, cols], per_row, costs_all[list(cols)])
                r = res.setdefault(f"{name}@{b:g}", {"damage": [], "share": [], "kl": [], "bits": []})
                r["damage"].append(float(full[np.arange(len(full)), np.asarray(cols)[cls]].sum()))
                r["share"].append({f"{costs_all[c_]:g}": float((cls == j).mean()) for j, c_ in enumerate(cols)})
                k_, b_ = allocation_kl(e, c, half, ref_lp, full[:, cols], pos, lay, per_row, n_layer,
                                       tuple(BITS[c_] for c_ in cols))
                r["kl"].append(k_)
                r["bits"].append(b_)
        print(f"chunk {ci + 1}/{a.kl_chunks} " + " ".join(
            f"{k_}: damage {v['damage'][-1]:.3g} KL {v['kl'][-1]:.4f} bits {v['bits'][-1]:.2f}"
            for k_, v in res.items()) + f" {time.time() - t0:.0f}s", flush=True)
    ratio = {f"{b:g}": float(np.mean(res[f"0/2/4/8/16@{b:g}"]["damage"]) / np.mean(res[f"2/4/8/16@{b:g}"]["damage"]))
             for b in budgets}
    out = {"command": " ".join(["python", "scripts/eviction_probe.py"] + sys.argv[1:]), "window": W,
           "window_bits": 8,
           "damage_ratio_with_eviction": ratio,
           "kl_mean": {k_: float(np.mean(v["kl"])) for k_, v in res.items()}, "arms": res, "seconds": time.time() - t0}
    write_json(a.json, out)
    print("damage with eviction / without:", " ".join(f"{k_}:{v:.3f}" for k_, v in ratio.items()))
    print("mean KL:", " ".join(f"{k_}:{v:.4f}" for k_, v in out["kl_mean"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
