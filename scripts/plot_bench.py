"""Redraw a `kvq bench --plot` PNG from its `--json` records (no re-measuring).

    python scripts/plot_bench.py results/bench_decode.json results/bench_decode.png "title"
"""
import json
import sys

from kvq_cli.eval.bench import BenchRecord, plot

if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    records = [BenchRecord(**r) for r in json.loads(open(src).read())]
    r0 = records[0]
    title = sys.argv[3] if len(sys.argv) > 3 else (
        f"kvq bench: {r0.model}, gen {r0.n_gen}, median of {r0.repeats}, {r0.threads} threads")
    plot(records, dst, title)
