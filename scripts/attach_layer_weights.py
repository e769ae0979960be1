"""Give a controller the layer weights a layer_sensitivity_probe.py run measured.

`kvq train --layer-weights N` measures them while training; this attaches the weights of a probe's
measurement (train.layer_sensitivity on the calibration text: `layer_kl` and `layer_damage` in its
JSON; train.layer_weights_of with --power, default LAYER_WEIGHT_POWER) to an existing controller
without refitting its MLP, as the arms of results/layer_weight_probe_p*.json got them.

Usage: python scripts/attach_layer_weights.py CONTROLLER.json PROBE.json --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli.controller import load_controller  # noqa: E402
from kvq_cli.train import LAYER_WEIGHT_POWER, layer_weights_of  # noqa: E402
from probe_common import run, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("controller")
    ap.add_argument("probe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--power", type=float, default=LAYER_WEIGHT_POWER, help="weights (KL / damage) ** power")
    a = ap.parse_args()
    spec = load_controller(a.controller)
    probe = json.loads(Path(a.probe).read_text())
    if spec.granularity != "token_layer":
        raise ValueError(f"{a.controller} decides per token: layer weights need a token_layer controller")
    spec.layer_weight = layer_weights_of(probe["layer_kl"], probe["layer_damage"], a.power).tolist()
    spec.extra["layer_weights"] = {"from": Path(a.probe).name, "command": probe["command"], "power": a.power,
                                   "layer_kl": probe["layer_kl"], "layer_damage": probe["layer_damage"]}
    spec.validate()
    write_json(a.out, spec.to_json())
    print(f"{a.out}: layer weights {min(spec.layer_weight):.3g} .. {max(spec.layer_weight):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
