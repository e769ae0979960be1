"""Scale one precision's predicted damage in a damage-head controller (a probe, not a shipped path).

A damage controller's output is logit_p = -(damage_p / lam + cost_p) (kvq_cli.train.damage_logits), so
multiplying class p's predicted damage by ALPHA is w2[p] *= ALPHA, b2[p] = ALPHA * (b2[p] + cost_p) - cost_p,
where cost_p is the bits the controller was trained with for that class (2.5 for the 2-bit class of
controllers trained before the 2.25-bit kvq2, as the shipped one).

Usage: python scripts/scale_damage_class.py IN.json OUT.json CLASS ALPHA COST
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.controller.spec import ControllerSpec, load_controller  # noqa: E402
from kvq_cli.errors import BadOption  # noqa: E402
from probe_common import run, write_json  # noqa: E402


def main() -> int:
    if len(sys.argv) != 6:
        raise BadOption("usage: scale_damage_class.py IN.json OUT.json CLASS ALPHA COST")
    src, dst, cls, alpha, cost = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    s = load_controller(src)
    if s.head != "logits" or not 0 <= cls < len(s.precisions) - 1 or alpha <= 0:
        raise BadOption("needs a damage (logits head) controller, a class below the f16 one and ALPHA > 0")
    w2, b2 = np.array(s.w2), np.array(s.b2)
    w2[cls] *= alpha
    b2[cls] = alpha * (b2[cls] + cost) - cost
    d = s.to_json()
    d["w2"], d["b2"] = w2.tolist(), b2.tolist()
    d.setdefault("extra", {})["scaled"] = {"class": cls, "alpha": alpha, "cost": cost}
    ControllerSpec.from_json(d).validate()
    write_json(dst, d)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
