"""Where the shipped controller's excess damage sits, on the held-out decode rows of `kvq train`'s cache.

Reads NAME.decode.npz of `kvq train --cache NAME.npz` (runtime trace features and first-order
damage of every decided (token, layer) row of the calibration chunks; the last 2 chunks are the
held-out ones), allocates at --budget bits by the shipped controller's predicted damage and by
the true damage (the oracle), and prints how concentrated the damage is and how well each
feature and the controller separate the rows the oracle keeps at 8 bits (AUC).

Usage: python scripts/damage_tail.py KVQ_HOME/calib-oracle.decode.npz [--budget 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.train.oracle import allocate  # noqa: E402
from probe_common import run, shipped_controller, shipped_damage  # noqa: E402


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Probability that a positive row scores above a negative one (ties broken by order)."""
    rank = np.empty(len(score))
    rank[np.argsort(score, kind="stable")] = np.arange(len(score))
    npos = int(y.sum())
    return float((rank[y].sum() - npos * (npos - 1) / 2) / (npos * (len(y) - npos)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--budget", type=float, default=3.0)
    a = ap.parse_args()
    z = np.load(a.cache)
    names = [str(n) for n in z["names"]]
    val = z["chunk"] >= z["chunk"].max() - 1
    d = z["damage"][val]
    spec = shipped_controller()
    x = np.stack([z["features"][val][:, names.index(n)] for n in spec.features], 1)
    pred = shipped_damage(spec, x)
    rows = np.arange(len(d))
    c_ctl, c_or = allocate(pred, a.budget), allocate(d, a.budget)
    dc, do = d[rows, c_ctl], d[rows, c_or]
    print(f"{len(d)} held-out decode rows ({Path(a.cache).name}), allocation at {a.budget:g} bits/row")
    print(f"mean damage: controller {dc.mean():.3e}, oracle {do.mean():.3e} ({dc.mean() / do.mean():.1f}x)")
    d2 = np.sort(d[:, 0])[::-1]
    for share in (0.01, 0.02, 0.05):
        k = int(round(share * len(d2)))
        print(f"the {100 * share:g}% of rows with the most 2-bit damage carry "
              f"{100 * d2[:k].sum() / d2.sum():.0f}% of it")
    ex = np.sort(dc - do)[::-1]
    for k in (100, 1000):
        print(f"the {k} rows with the most excess damage (controller - oracle) carry "
              f"{100 * ex[:k].sum() / ex.sum():.0f}% of the excess")
    y = c_or == 2
    print(f"rows the oracle keeps at 8 bits: {100 * y.mean():.1f}%; of them the controller puts "
          f"{100 * (c_ctl[y] == 0).mean():.0f}% at 2 bits")
    print("AUC for those rows: " + ", ".join(f"{n} {auc(x[:, i], y):.2f}" for i, n in enumerate(spec.features))
          + f"; controller's predicted 2-bit damage {auc(pred[:, 0], y):.2f}; true 2-bit damage {auc(d[:, 0], y):.2f}")
    rho = np.corrcoef(np.argsort(np.argsort(pred[:, 0])), np.argsort(np.argsort(d[:, 0])))[0, 1]
    print(f"rank correlation of predicted and true 2-bit damage: {rho:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
