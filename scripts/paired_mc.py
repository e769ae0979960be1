"""Paired multiple-choice difference of one policy between two `kvq eval --json` runs on the same items.

    python scripts/paired_mc.py BEFORE.json AFTER.json POLICY

For the tasks both runs have complete for POLICY: the mean over tasks of acc_norm(AFTER) -
acc_norm(BEFORE) in points, with the bootstrap 95% interval of plot_pareto_mc.average_diff (items
resampled within each task), and per task the items AFTER gets right where BEFORE was wrong (+) and
the reverse (-). Used when the shipped controller changes: the same policy name, another controller.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_pareto_mc import average_diff, correct  # noqa: E402
from kvq_cli.errors import run_script  # noqa: E402


def main() -> int:
    if len(sys.argv) != 4:
        raise ValueError("usage: paired_mc.py BEFORE.json AFTER.json POLICY")
    before, after, policy = sys.argv[1:]
    recs = [{r["task"]: r for r in json.loads(Path(f).read_text()) if r["kv"] == policy and r.get("complete")}
            for f in (before, after)]
    tasks = sorted(set(recs[0]) & set(recs[1]))
    if not tasks:
        raise ValueError(f"no task complete for {policy} in both files")
    point, lo, hi = average_diff({t: recs[1][t] for t in tasks}, {t: recs[0][t] for t in tasks})
    print(f"{policy}: after - before {100 * point:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}] over {', '.join(tasks)}")
    for t in tasks:
        d = correct(recs[1][t]) - correct(recs[0][t])
        print(f"  {t}: +{int((d > 0).sum())} / -{int((d < 0).sum())} of {len(d)} items")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
