"""How a controller's damage estimates break physics on held-out calibration rows, and what the damage
floor (`kvq train --damage-floor P`, ControllerSpec.damage_floor) does to the damage of its decisions.

Calibration text only (tuning data), offline: the rows `kvq train --cache NAME` collected (NAME.decode.npz,
NAME.prompt.npz), with their measured damage at every precision. On the held-out decode chunks (the last
2, as `kvq train` holds them out) it reports the share of rows whose estimated 2-bit damage is negative or
below the 4-bit estimate, then for each percentile P (0: no floor; the floor's ratios from the training
rows of both regimes, as `kvq train` computes them) and each budget B the measured damage of the
controller's decisions at the price that puts those rows at B bits (the same allocation rule as the
runtime, globally instead of online) and the share of rows at 2 bits.

Usage: python scripts/damage_floor_probe.py CACHE --model GGUF [--percentiles 0,0.1,1] [--budgets 3,3.5,4.5,6]
       --json OUT      (CACHE as given to kvq train --cache)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.controller.spec import EFF_BITS_OF, controller_from_reader, project_damage  # noqa: E402
from kvq_cli.gguf.read import read_gguf  # noqa: E402
from kvq_cli.train.damage import PRECISIONS  # noqa: E402
from kvq_cli.train.collect import PROMPT_HELD_OUT, Collected, merge_regimes  # noqa: E402
from kvq_cli.train.oracle import allocate  # noqa: E402
from kvq_cli.train.fit import damage_floor  # noqa: E402
from probe_common import run, write_json  # noqa: E402


def load(path: Path) -> Collected:
    if not path.is_file():
        raise ValueError(f"no such cache file: {path}")
    z = np.load(path, allow_pickle=False)
    return Collected(z["features"], z["damage"], z["layer"], z["pos"], z["chunk"], [str(n) for n in z["names"]],
                     int(z["n_layer"]), None, PRECISIONS)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--model", required=True, help="GGUF with the controller (its MLP; its own floor is ignored)")
    ap.add_argument("--percentiles", default="0,0.1,1")
    ap.add_argument("--budgets", default="3,3.5,4.5,6")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    pcts = [float(p) for p in a.percentiles.split(",")]
    budgets = [float(b) for b in a.budgets.split(",")]
    if any(not 0 <= p < 50 for p in pcts) or any(not 2.25 <= b <= 16 for b in budgets):
        raise ValueError("--percentiles must be in [0, 50) and --budgets in [2.25, 16]")
    base = Path(a.cache)
    dec = load(base.with_name(f"{base.stem}.decode.npz"))
    pro = load(base.with_name(f"{base.stem}.prompt.npz"))
    n_prompts = len(np.unique(pro.chunk))
    merged, n_val = merge_regimes(dec, pro, 2, max(2, int(n_prompts * PROMPT_HELD_OUT)))
    train_rows = ~np.isin(merged.chunk, np.unique(merged.chunk)[-n_val:])
    held = np.isin(dec.chunk, np.unique(dec.chunk)[-2:])          # held-out decode rows
    spec = controller_from_reader(read_gguf(a.model))
    if spec is None or spec.head != "logits" or list(spec.precisions) != list(PRECISIONS):
        raise ValueError(f"{a.model}: needs a controller with the logits head and precisions {list(PRECISIONS)}")
    costs = np.array([EFF_BITS_OF[p] for p in spec.precisions])
    layer = dec.layer[held] if spec.granularity == "token_layer" else None
    x = dec.features[held][:, [dec.names.index(f) for f in spec.features]]
    est = -(replace(spec, damage_floor=None).logits(x, layer).astype(np.float64) + costs)   # damage / lambda
    true = dec.damage[held]
    out = {"command": "python scripts/damage_floor_probe.py " + " ".join(sys.argv[1:]), "model": Path(a.model).name,
           "held_out_rows": int(held.sum()),
           "share_2bit_estimate_negative": float((est[:, 0] < 0).mean()),
           "share_2bit_estimate_below_4bit": float((est[:, 0] < est[:, 1]).mean()),
           "share_measured_2bit_below_4bit": float((true[:, 0] < true[:, 1]).mean()), "arms": {}}
    print(f"{out['held_out_rows']} held-out decode rows: 2-bit estimate < 0 on {100 * out['share_2bit_estimate_negative']:.1f}%, "
          f"< the 4-bit estimate on {100 * out['share_2bit_estimate_below_4bit']:.1f}% (measured: "
          f"{100 * out['share_measured_2bit_below_4bit']:.3f}%)")
    for p in pcts:
        floor = damage_floor(merged.damage[train_rows], p) if p > 0 else None
        d = est if floor is None else project_damage(est, floor)
        arm = {"floor": floor, "budgets": {}}
        for b in budgets:
            c = allocate(d, b, costs)
            arm["budgets"][f"{b:g}"] = {"damage": float(true[np.arange(len(c)), c].mean()),
                                        "bits": float(costs[c].mean()), "share_2bit": float((c == 0).mean())}
        out["arms"][f"P={p:g}"] = arm
        print(f"P={p:g} floor {None if floor is None else [round(f, 3) for f in floor]}: " + ", ".join(
            f"@{b}: damage {v['damage']:.3g} (2-bit {100 * v['share_2bit']:.0f}%)" for b, v in arm["budgets"].items()))
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
