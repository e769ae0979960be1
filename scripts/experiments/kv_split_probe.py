"""Does the first-order damage weigh V errors right against K errors? (issue 7, calibration text only)

    python scripts/kv_split_probe.py CALIB_TXT --json OUT [--kl-chunks 4] [--alphas 1,3,10] [--budget 3]

On each held-out calibration chunk (the chunks of window_probe.py), the all-f16 decode with the
q8_0 window of W = 128 gives every decided row's first-order damage (train.layer_damage) at 2, 4
and 8 bits twice: with only its K rounded (V exact) and with only its V rounded. The oracle then
allocates damage_K + alpha * damage_V at the budget (the final window at q8_0, as oracle@B) for each
alpha, and the probe reports the KL of the chunk's second half vs the all-f16 decode with that
allocation installed (probe_common.allocation_kl). alpha = 1 is the training target's weighting (up
to the small K/V cross term); if a larger alpha lowers KL, the target undervalues V errors.
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
from kvq_cli.train.damage import decided_rows, layer_damage, roundtrip_deltas  # noqa: E402
from probe_common import add_kl_args, allocation_kl, oracle_refs, run, shipped_controller, write_json  # noqa: E402

W = 128


def split_damage(e, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """K-only and V-only damage [rows, 3] (2/4/8 bits) of every layer's decided rows; positions; layers."""
    def layer(il: int) -> tuple[np.ndarray, np.ndarray]:
        q, qpos = e.queries(il)
        k, v, kpos, _ = e.read_layer(il)
        dks, dvs = roundtrip_deltas(e, k, 0), roundtrip_deltas(e, v, 1)
        zk, zv = [np.zeros_like(k)] * len(dks), [np.zeros_like(v)] * len(dvs)
        return layer_damage(q, qpos, k, v, kpos, list(dks) + zk, zv + list(dvs), W)[0], kpos

    d, pos, lay = decided_rows(e, n, W, layer)
    return d[:, :3], d[:, 3:], pos, lay


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    add_kl_args(ap, kl_chunks=4)
    ap.add_argument("--alphas", default="1,3,10")
    a = ap.parse_args()
    alphas = [float(x) for x in a.alphas.split(",")]
    t0 = time.time()
    spec = shipped_controller()
    text = Path(a.calib).read_text(encoding="utf-8", errors="replace")
    opts = KvqOptions(window=W, window_bits=8, per_layer=True, record_q=True)
    kl: dict[str, list[float]] = {}
    share: dict[str, list[float]] = {}
    ratio = []
    for e, ci, c, ref_lp in oracle_refs(text, a, opts, spec.k_center):
        n, half = len(c), len(c) // 2
        dk, dv, pos, lay = split_damage(e, n)
        ratio.append(float(dk[:, 0].sum() / max(dv[:, 0].sum(), 1e-30)))
        per_row = (a.budget * n - EFF_BITS_OF[8] * W) / (n - W)
        for al in alphas:
            full = np.concatenate([dk + al * dv, np.zeros((len(dk), 1))], 1)
            k_, b_ = allocation_kl(e, c, half, ref_lp, full, pos, lay, per_row, e.dims.n_layer)
            kl.setdefault(f"{al:g}", []).append(k_)
            share.setdefault(f"{al:g}", []).append(b_)
        print(f"chunk {ci + 1}/{a.kl_chunks}: 2-bit damage K/V {ratio[-1]:.1f}x " + " ".join(
            f"alpha {k_}: KL {v[-1]:.4f}" for k_, v in kl.items()) + f" {time.time() - t0:.0f}s", flush=True)
    out = {"command": " ".join(["python", "scripts/kv_split_probe.py"] + sys.argv[1:]), "window": W, "window_bits": 8,
           "budget": a.budget, "k_over_v_2bit_damage": ratio,
           "kl_mean": {k_: float(np.mean(v)) for k_, v in kl.items()},
           "kl": kl, "bits": share, "seconds": time.time() - t0}
    write_json(a.json, out)
    print("mean KL:", " ".join(f"alpha {k_}: {v:.4f}" for k_, v in out["kl_mean"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
