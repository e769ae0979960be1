"""Average the logits of several controllers in one MLP (a probe, not a shipped path).

Each controller's feature normalisation is folded into its first layer (w1 / std, b1 - w1 / std . mean),
the hidden layers are put side by side and the output layers averaged, so the runtime's MLP computes
the mean of the members' logits. The controllers must have the same features, precisions, head and
granularity; the K centering of the last one is kept (the calibration chunks are the same, so it is
the same vector: checked).

Usage: python scripts/combine_controllers.py OUT.json CONTROLLER.json CONTROLLER.json [...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli.controller import ControllerSpec, load_controller  # noqa: E402
from kvq_cli.errors import BadOption  # noqa: E402
from kvq_cli.gguf_write import atomic_output  # noqa: E402
from kvq_cli.train import average_mlps  # noqa: E402
from probe_common import run  # noqa: E402


def combine(specs: list[ControllerSpec]) -> ControllerSpec:
    first = specs[0]
    for s in specs[1:]:
        if (s.features, s.precisions, s.head, s.granularity) != (first.features, first.precisions, first.head,
                                                                  first.granularity):
            raise BadOption("controllers differ in features, precisions, head or granularity")
        if (s.k_center is None) != (first.k_center is None) or (
                s.k_center is not None and not np.array_equal(np.array(s.k_center), np.array(first.k_center))):
            raise BadOption("controllers differ in their K centering")
    folded = []
    for s in specs:
        w1 = np.array(s.w1) / np.array(s.feature_std)
        folded.append([w1, np.array(s.b1) - w1 @ np.array(s.feature_mean), np.array(s.w2), np.array(s.b2)])
    w1, b1, w2, b2 = average_mlps(folded)
    nf = len(first.features)
    last = specs[-1]
    return ControllerSpec(features=list(first.features), precisions=list(first.precisions),
                          w1=w1.tolist(), b1=b1.tolist(), w2=w2.tolist(), b2=b2.tolist(),
                          feature_mean=[0.0] * nf, feature_std=[1.0] * nf, budget_bits=last.budget_bits,
                          granularity=first.granularity, extra={"combined": len(specs)},
                          k_center=last.k_center, head=first.head, damage_floor=last.damage_floor).validate()


def main() -> int:
    if len(sys.argv) < 4:
        raise BadOption("usage: combine_controllers.py OUT.json CONTROLLER.json CONTROLLER.json [...]")
    spec = combine([load_controller(p) for p in sys.argv[2:]])
    spec.extra["combined"] = sys.argv[2:]
    with atomic_output(sys.argv[1]) as tmp:
        tmp.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    print(f"{sys.argv[1]}: {spec.hidden} hidden units from {len(sys.argv) - 2} controllers")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
