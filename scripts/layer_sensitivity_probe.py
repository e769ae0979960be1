"""Are the layers' damages comparable? Per-layer KL sensitivity, and the oracle with it.

Calibration text only (tuning data). `kvq train` measures a row's damage as the first-order change
of its layer's attention output relative to that layer's mean output (train.layer_damage), so one
unit of damage is taken to cost the same in every layer. This probe measures what a unit costs in
KL per layer:

1. Sensitivity (train.layer_sensitivity). On --sens-chunks chunks of --sens-len tokens from token
   --sens-offset (apart from the held-out chunks), the all-f16 decode (q8_0 window of W = 128, as the
   Pareto rows) gives every decided row's damage at --sens-bits; then, for each layer l, the decode
   with that layer's decided rows at --sens-bits and every other row at f16 gives KL_l vs the all-f16
   decode. The layer's weight here is KL_l / D_l (D_l its rows' damage), scaled so that the weighted
   damage sums to the unweighted sum (train.layer_weights_of with power 1; a controller ships
   the square root, LAYER_WEIGHT_POWER).
2. The oracle with the weights. On the held-out chunks of window_probe.py (--kl-chunks), each
   decided row's damage at 2/4/8 bits is allocated globally at each budget (final window at q8_0,
   as oracle@B) as measured ("oracle") and multiplied by its layer's weight ("oracle+w"), and each
   allocation's KL vs the all-f16 decode is reported (probe_common.allocation_kl).

Usage: python scripts/layer_sensitivity_probe.py CALIB_TXT --json OUT [--sens-chunks 2]
       [--sens-len 1024] [--sens-bits 2] [--kl-chunks 4] [--budgets 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli.models import embedded_path  # noqa: E402
from kvq_cli.runtime.kv import KvqOptions  # noqa: E402
from kvq_cli.train import EFF_BITS_OF, SENS_WINDOW as W, decided_damage, layer_sensitivity  # noqa: E402
from probe_common import (add_kl_args, allocation_kl, oracle_refs, run, shipped_controller, with_f16,  # noqa: E402
                          write_json)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    add_kl_args(ap, kl_chunks=4)
    ap.add_argument("--budgets", default="3")
    ap.add_argument("--sens-chunks", type=int, default=2)
    ap.add_argument("--sens-len", type=int, default=1024)
    ap.add_argument("--sens-offset", type=int, default=50_000)
    ap.add_argument("--sens-bits", type=int, default=2, choices=(2, 4, 8))
    a = ap.parse_args()
    budgets = [float(b) for b in a.budgets.split(",")]
    t0 = time.time()
    spec = shipped_controller()
    text = Path(a.calib).read_text(encoding="utf-8", errors="replace")
    opts = KvqOptions(window=W, window_bits=8, per_layer=True, record_q=True)
    ls = layer_sensitivity(embedded_path(), text, k_center=np.asarray(spec.k_center, np.float32),
                           n_chunks=a.sens_chunks, chunk_len=a.sens_len, offset=a.sens_offset, bits=a.sens_bits,
                           on_layer=lambda i, n: print(f"sensitivity {i}/{n} {time.time() - t0:.0f}s", flush=True)
                           if i % 30 == 0 else None)
    w = ls.weight(power=1.0)
    print("layer KL at", a.sens_bits, "bits:", " ".join(f"{x:.3g}" for x in ls.kl))
    print("layer weights:", " ".join(f"{x:.2f}" for x in w))
    res: dict[str, dict[str, list[float]]] = {}
    for e, ci, c, ref_lp in oracle_refs(text, a, opts, spec.k_center):
        n, half, n_layer = len(c), len(c) // 2, e.dims.n_layer
        d, pos, lay = decided_damage(e, n, W)
        for b in budgets:
            per_row = (b * n - EFF_BITS_OF[8] * W) / (n - W)
            for name, dd in (("oracle", d), ("oracle+w", d * w[lay][:, None])):
                k_, b_ = allocation_kl(e, c, half, ref_lp, with_f16(dd), pos, lay, per_row, n_layer)
                r = res.setdefault(f"{name}@{b:g}", {"kl": [], "bits": []})
                r["kl"].append(k_)
                r["bits"].append(b_)
        print(f"chunk {ci + 1}/{a.kl_chunks} " + " ".join(f"{k_}: KL {v['kl'][-1]:.4f} bits {v['bits'][-1]:.2f}"
                                                      for k_, v in res.items()) + f" {time.time() - t0:.0f}s", flush=True)
    out = {"command": " ".join(["python", "scripts/layer_sensitivity_probe.py"] + sys.argv[1:]), "window": W,
           "window_bits": 8, "sens_bits": a.sens_bits, "layer_kl": ls.kl.tolist(),
           "layer_damage": ls.damage.tolist(), "layer_weight": w.tolist(),
           "kl_mean": {k_: float(np.mean(v["kl"])) for k_, v in res.items()}, "arms": res, "seconds": time.time() - t0}
    write_json(a.json, out)
    print("mean KL:", " ".join(f"{k_}:{v:.4f}" for k_, v in out["kl_mean"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
