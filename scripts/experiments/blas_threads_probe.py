"""Does OpenBLAS's thread pool slow calibration down, and where does a calibration prompt's time go?

Times the prompt regime of the calibration (train.collect.collect_prompts, the first N prompts of the
packaged text on the embedded model) in a fresh process per setting: OpenBLAS with one thread (what
kvq_cli sets) and with its default (a thread per core). Also the model's own forward pass of the same
prompts (stock f16 cache, prompt then continuation), the floor under the oracle's work.

    .venv/bin/python scripts/experiments/blas_threads_probe.py [--prompts 20] > results/blas_threads_probe.txt
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from kvq_cli.models.registry import embedded_path
from kvq_cli.runtime.inspector import Inspector
from kvq_cli.runtime.kv import KvPolicy, parse_kv
from kvq_cli.train.calibrate import calibration_text
from kvq_cli.train.collect import collect_prompts, prompt_chunks
m = embedded_path()
with Inspector(m, kv=KvPolicy("f16", kvq="static"), n_ctx=256) as tok:
    pairs = prompt_chunks(tok, calibration_text(), {n})
if {forward}:
    with Inspector(m, kv=parse_kv("stock-f16"), n_ctx=256, n_batch=256, n_ubatch=256) as e:
        t = time.perf_counter()
        for ctx, cont in pairs:
            e.decode(ctx, 0)
            e.decode(cont, len(ctx))
        print(time.perf_counter() - t)
else:
    t = time.perf_counter()
    collect_prompts(m, pairs, v_weight=10.0)
    print(time.perf_counter() - t)
"""


def run(n: int, forward: bool, blas: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if blas is not None:
        env["OPENBLAS_NUM_THREADS"] = blas
    else:
        env["OPENBLAS_NUM_THREADS"] = str(os.cpu_count() or 1)   # OpenBLAS's own default: a thread per core
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), n=n, forward=forward)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    n = ap.parse_args().prompts
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"# command: python scripts/experiments/blas_threads_probe.py --prompts {n}   "
          f"({time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, nothing else running)")
    for label, blas in (("OpenBLAS 1 thread (kvq's setting)", "1"), (f"OpenBLAS {os.cpu_count()} threads (its default)", None)):
        s = run(n, False, blas)
        print(f"prompt regime, {n} prompts, {label}: {s:.2f} s ({s / n:.3f} s per prompt)")
    s = run(n, True, "1")
    print(f"model forward pass only (stock f16), the same {n} prompts: {s:.2f} s ({s / n:.3f} s per prompt)")


if __name__ == "__main__":
    main()
