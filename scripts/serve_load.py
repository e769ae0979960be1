#!/usr/bin/env python3
"""A bounded load run of llama-server, one cache after another in one run: stock f16 and q4_0 caches and
kvq's adaptive cache, the same clients and prompts, zero failures expected.

Usage: .venv/bin/python scripts/serve_load.py [--kv stock-f16,stock-q4_0,adaptive@3] [--parallel 4]
       [--ctx 2048] [--clients 8] [--requests 25] [--max-tokens 64] [--prompt-tokens 1800] [--json OUT]

Each client sends the same document of --prompt-tokens tokens (the packaged calibration text) with a
question of its own; every slot thus decodes near --ctx. Prints tokens/s, p50/p95 latency, the server's
peak RSS and its KV memory, with the ratios against the first cache.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvq_cli.eval.load import fit_prompt, run_load  # noqa: E402
from kvq_cli.eval.machine import machine_summary  # noqa: E402
from kvq_cli.models.registry import embedded_path, model_ref, resolve  # noqa: E402
from kvq_cli.runtime.kv import parse_kv, parse_kv_list  # noqa: E402
from kvq_cli.runtime.server import ServeConfig, Server  # noqa: E402
from kvq_cli.train.calibrate import calibration_text  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--kv", default="stock-f16,stock-q4_0,adaptive@3")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1800)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    resolved = resolve(a.model or str(embedded_path()))
    policies = parse_kv_list(a.kv)
    # the prompts, cut with the model's tokenizer by a short-lived stock server
    with Server(model_ref(resolved, [parse_kv("stock-f16")]),
                ServeConfig(parse_kv("stock-f16"), parallel=1, ctx=a.prompt_tokens + 512, port=0)) as srv:
        doc = fit_prompt(srv.url, calibration_text(), a.prompt_tokens - 24)
    prompts = [f"{doc}\n\nQuestion {i + 1}: in one paragraph, what is passage {i + 1} about?\nAnswer:"
               for i in range(a.clients)]
    cmd = "python scripts/serve_load.py " + " ".join(sys.argv[1:])
    print(f"# {cmd}\n# {time.strftime('%Y-%m-%d', time.gmtime())}, {machine_summary()}; {a.parallel} slots x "
          f"{a.ctx} tokens, {a.clients} clients x {a.requests} requests of {a.prompt_tokens} prompt tokens "
          f"+ {a.max_tokens} generated", flush=True)
    records = []
    for p in policies:
        r = run_load(model_ref(resolved, [p]), p, prompts, parallel=a.parallel, ctx=a.ctx, requests=a.requests,
                     max_tokens=a.max_tokens, threads=a.threads)
        records.append(r)
        print(f"{r.kv:>12}: {r.requests} requests, {r.failed} failed, {r.tokens_per_s:6.1f} tokens/s, "
              f"p50 {r.latency_p50_s:5.2f} s, p95 {r.latency_p95_s:5.2f} s, peak RSS {r.server_peak_rss_mib:6.1f} MiB, "
              f"KV {r.kv_mib:6.2f} MiB", flush=True)
    base = records[0]
    for r in records[1:]:
        kv_ratio = r.kv_mib / base.kv_mib
        print(f"{r.kv} vs {base.kv}: {r.tokens_per_s / base.tokens_per_s:.2f}x tokens/s, "
              f"{kv_ratio:.1%} of its KV memory, {r.server_peak_rss_mib / base.server_peak_rss_mib:.2f}x peak RSS")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": cmd, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                                            "machine": machine_summary(), "records": [asdict(r) for r in records]},
                                           indent=1) + "\n")
    return 1 if any(r.failed for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
