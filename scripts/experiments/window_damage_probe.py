"""Could a causal policy estimate each row's damage from the queries it has already seen?

Calibration text only (tuning data). The oracle measures a row's first-order damage with the
queries after its window, which no causal policy has. The same formula with the queries inside
the window (kpos < qpos <= kpos + W, `layer_damage(span="window")`) is known when the row leaves
the window. For each held-out calibration chunk (--kl-chunks chunks of --kl-len tokens from
--kl-offset, the chunks of window_probe.py), with the q8_0 window of W = 128 the Pareto rows use,
the rows are allocated globally at --budget bits (the final window at q8_0, as oracle@B) by:
  oracle      the true damage (queries after the window)
  window      the damage from the window's queries, plain rounding
  controller  the shipped controller's predicted damage on the all-f16 decode's features
and KL of the second half vs the all-f16 decode is measured (probe_common.allocation_kl). Also
the Spearman rank correlation of each estimate's 2-bit damage with the true one, per chunk.

Usage: python scripts/window_damage_probe.py CALIB_TXT --json OUT [--kl-chunks 4]
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
from kvq_cli.train.damage import engine_layer_damage  # noqa: E402
from probe_common import (add_kl_args, allocation_kl, controller_damage, oracle_refs, run,  # noqa: E402
                          shipped_controller, write_json)

W = 128


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    add_kl_args(ap, kl_chunks=4)
    a = ap.parse_args()
    t0 = time.time()
    spec = shipped_controller()
    text = Path(a.calib).read_text(encoding="utf-8", errors="replace")
    kl: dict[str, list[float]] = {}
    bits_seen: dict[str, list[float]] = {}
    rho: dict[str, list[float]] = {}
    opts = KvqOptions(window=W, window_bits=8, trace=True, per_layer=True, record_q=True)
    for e, ci, c, ref_lp in oracle_refs(text, a, opts, spec.k_center):
        n, half, n_layer = len(c), len(c) // 2, e.dims.n_layer
        tr = e.trace()
        sel = tr.pos < n - W
        pos, lay = tr.pos[sel], tr.layer[sel]
        est = {name: np.zeros((len(pos), 4)) for name in ("oracle", "window")}
        for il in range(n_layer):
            m_ = lay == il
            for name, span in (("oracle", "later"), ("window", "window")):
                dm, _, kpos = engine_layer_damage(e, il, W, span=span)
                at = {int(p_): i for i, p_ in enumerate(kpos)}
                est[name][m_, :3] = dm[[at[int(p_)] for p_ in pos[m_]]]
        x = tr.features[sel][:, [tr.names.index(f) for f in spec.features]]
        est["controller"] = controller_damage(spec, x)
        per_row = (a.budget * n - EFF_BITS_OF[8] * W) / (n - W)
        for name, d in est.items():
            k_, b_ = allocation_kl(e, c, half, ref_lp, d, pos, lay, per_row, n_layer)
            kl.setdefault(name, []).append(k_)
            bits_seen.setdefault(name, []).append(b_)
            rho.setdefault(name, []).append(spearman(d[:, 0], est["oracle"][:, 0]))
        print(f"chunk {ci + 1}/{a.kl_chunks} " + " ".join(f"{k_}={v[-1]:.4f}" for k_, v in kl.items())
              + " rho " + " ".join(f"{k_}={v[-1]:.2f}" for k_, v in rho.items())
              + f" {time.time() - t0:.0f}s", flush=True)
    out = {"command": " ".join(["python", "scripts/window_damage_probe.py"] + sys.argv[1:]), "budget": a.budget,
           "window": W, "window_bits": 8,
           "kl": {k_: {"mean": float(np.mean(v)), "chunks": v, "bits": bits_seen[k_]} for k_, v in kl.items()},
           "spearman_2bit_vs_oracle": {k_: {"mean": float(np.mean(v)), "chunks": v} for k_, v in rho.items()},
           "seconds": time.time() - t0}
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
