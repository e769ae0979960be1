"""Train the generic controller, kvq_cli/controller/shipped/generic.json (controller/catalog.py).

The model-agnostic controller `--kv adaptive` falls back on for a model with no controller of its
own: the default recipe of `kvq calibrate` without K centering (a per-model vector), with its
features normalised at run time by statistics of the model it runs on (ControllerSpec.norm_prior,
a prior of --norm-prior rows at the training model's statistics). Trained on the embedded
SmolLM2-135M-Instruct and the calibration text kvq ships.

    .venv/bin/python scripts/train_generic.py [--norm-prior 64] [--cache DIR/generic.npz] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvq_cli.controller.catalog import GENERIC  # noqa: E402
from kvq_cli.gguf.write import atomic_output  # noqa: E402
from kvq_cli.models.registry import resolve  # noqa: E402
from kvq_cli.train.calibrate import calibration_text  # noqa: E402
from kvq_cli.train.pipeline import TrainConfig, train_controller  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model to train on (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--norm-prior", type=int, default=64, help="rows of prior weight of the run-time normalisation")
    ap.add_argument("--cache", default=None, help="NPZ of the collected rows (reused when it exists)")
    ap.add_argument("--out", default=str(GENERIC))
    args = ap.parse_args()
    cfg = TrainConfig(k_center=False, norm_prior=args.norm_prior)
    model = resolve(args.model).path
    spec, report = train_controller(model, calibration_text(), cfg, calib_name="kvq calibration text",
                                    cache=Path(args.cache) if args.cache else None)
    spec.extra["recipe"] = "scripts/train_generic.py"
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    print(f"{args.out}: held-out damage {report.val_damage:.3g} at {report.val_bits:.2f} bits/row "
          f"(oracle {report.oracle_damage:.3g}, static mix {report.static_damage:.3g}), norm_prior {spec.norm_prior}")


if __name__ == "__main__":
    main()
