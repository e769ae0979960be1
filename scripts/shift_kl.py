#!/usr/bin/env python3
"""KL of the next tokens after llama.cpp-style context shifts, per cache, side by side in one run.

Usage: .venv/bin/python scripts/shift_kl.py --data DATA [--model M] [--kv adaptive@3,adaptive@3.5,q4,stock-q4_0]
       [--ctx 512] [--chunks 8] [--keep 0] [--json OUT] [--md OUT]

wikitext-2 test, consecutive chunks of 3 x --ctx tokens, fed in 32-token pieces to a --ctx cache that
shifts when full (keep --keep, drop half of the rest) and to a cache holding the whole chunk; every token
after the first shift is scored (kvq_cli/eval/shift.py has the definitions). The claim checked: each
cache's KL against the unshifted f16 cache is within 1.5x of the shifted f16 cache's.
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

from kvq_cli.eval.machine import machine_summary  # noqa: E402
from kvq_cli.eval.scoring import load_wikitext  # noqa: E402
from kvq_cli.eval.shift import F16, shift_kl  # noqa: E402
from kvq_cli.models.registry import embedded_path, model_ref, resolve  # noqa: E402
from kvq_cli.runtime.engine import Engine  # noqa: E402
from kvq_cli.runtime.kv import parse_kv, parse_kv_list  # noqa: E402

LIMIT = 1.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--kv", default="adaptive@3,adaptive@3.5,q4,stock-q4_0")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--keep", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args()

    resolved = resolve(a.model or str(embedded_path()))
    names = [p.name for p in parse_kv_list(a.kv)]
    ref = model_ref(resolved, [parse_kv(n) for n in names])
    with Engine(ref, kv=parse_kv(F16), n_ctx=64) as e:
        toks = e.tokenize(load_wikitext(a.data))
    n = 3 * a.ctx
    chunks = [toks[i * n:(i + 1) * n] for i in range(min(a.chunks, len(toks) // n))]
    cmd = "python scripts/shift_kl.py " + " ".join(sys.argv[1:])
    head = (f"{cmd}\n{time.strftime('%Y-%m-%d', time.gmtime())}, {machine_summary()}; wikitext-2 test, "
            f"{len(chunks)} chunks of {n} tokens, a {a.ctx}-token cache shifting (keep {a.keep}, drop half)")
    print("# " + head.replace("\n", "\n# "), flush=True)
    records = shift_kl(ref, chunks, names, n_ctx=a.ctx, n_keep=a.keep, threads=a.threads,
                       on_chunk=lambda i: print(f"# chunk {i + 1}/{len(chunks)}", file=sys.stderr, flush=True))
    base = next(r for r in records if r.policy == F16).kl_vs_full
    lines = ["| cache | bits/elem held | KL vs f16 full context | x f16 shifted | KL vs f16 shifted | "
             "KL without shift | shifts |", "|---|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for r in records:
        ratio = r.kl_vs_full / base
        ok &= ratio <= LIMIT
        lines.append(f"| {r.policy} | {r.bits_per_elem:.2f} | {r.kl_vs_full:.4f} | {ratio:.2f} | "
                     f"{r.kl_vs_f16_shifted:.4f} | {r.kl_unshifted:.4f} | {r.shifts} |")
    verdict = f"every cache within {LIMIT}x of the shifted f16 cache: {'yes' if ok else 'NO'}"
    print("\n".join(lines + ["", verdict]))
    if a.md:
        Path(a.md).write_text(f"<!-- {head} -->\n" + "\n".join(lines + ["", verdict]) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": cmd, "date": time.strftime('%Y-%m-%d', time.gmtime()),
                                            "machine": machine_summary(), "ctx": a.ctx, "chunk_tokens": n,
                                            "chunks": len(chunks), "keep": a.keep, "limit": LIMIT, "pass": ok,
                                            "records": [asdict(r) for r in records]}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
