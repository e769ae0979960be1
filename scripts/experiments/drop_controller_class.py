"""Remove one output class from a controller (a probe, not a shipped path).

The runtime takes the argmax over the controller's classes, so dropping a class (its row of w2 and its b2)
leaves every other class's logit as it was: rows that chose the dropped class take their next best, and the
price the budget knob sets moves the rest. Used to cap the shipped controller at q8_0 (drop 16).

Usage: python scripts/drop_controller_class.py IN.json OUT.json BITS
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.controller.spec import ControllerSpec, load_controller  # noqa: E402
from kvq_cli.errors import BadOption  # noqa: E402
from probe_common import run, write_json  # noqa: E402


def main() -> int:
    if len(sys.argv) != 4:
        raise BadOption("usage: drop_controller_class.py IN.json OUT.json BITS")
    src, dst, bits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = load_controller(src)
    if bits not in s.precisions or len(s.precisions) < 3:
        raise BadOption(f"the controller's classes are {s.precisions}: BITS must be one of them, with 2 left")
    i = s.precisions.index(bits)
    d = s.to_json()
    for key in ("precisions", "w2", "b2"):
        d[key] = d[key][:i] + d[key][i + 1:]
    d.setdefault("extra", {})["dropped_class"] = bits
    ControllerSpec.from_json(d).validate()
    write_json(dst, d)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
