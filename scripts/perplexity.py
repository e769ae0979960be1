#!/usr/bin/env python3
"""Wikitext-2 perplexity and KL vs a reference for several KV policies, side by side.

Usage: scripts/perplexity.py --data ../shared/data --kv stock-f16,stock-q8_0,f16,q8 \
           [--tokens 32768] [--ctx 512] [--model PATH] --json results/x.json
The first --kv policy is the KL reference. Writes JSON {command, model, records}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvq_cli.errors import KvqError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--kv-bits", type=float, default=None)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    from kvq_cli.evaluate import load_wikitext, perplexity, records_to_json
    from kvq_cli.gguf_write import atomic_output
    from kvq_cli.models import resolve
    from kvq_cli.runtime.kv import KvqOptions, parse_kv_list

    try:
        model = resolve(a.model)
        policies = parse_kv_list(a.kv)
        text = load_wikitext(a.data)

        def progress(i, n):
            print(f"\rchunk {i}/{n}", end="", file=sys.stderr, flush=True)

        recs = perplexity(model.path, policies, text, n_tokens=a.tokens, n_ctx=a.ctx, n_ubatch=a.ubatch,
                          kvq=KvqOptions(window=a.window, budget_bits=a.kv_bits), on_chunk=progress)
        print(file=sys.stderr)
        out = {"command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
               "model": model.path.name, "threads": os.cpu_count(), "records": records_to_json(recs)}
        with atomic_output(a.json) as tmp:
            tmp.write_text(json.dumps(out, indent=2) + "\n")
        print(f"{'kv':12} {'bits':>6} {'ppl':>9} {'KL':>8} {'top1':>6} {'sec':>7}")
        for r in recs:
            kl = f"{r.kl:.4f}" if r.kl is not None else "ref"
            t1 = f"{r.top1_agree:.3f}" if r.top1_agree is not None else "-"
            print(f"{r.kv:12} {r.bits_per_elem:6.2f} {r.ppl:9.3f} {kl:>8} {t1:>6} {r.seconds:7.1f}")
        return 0
    except KvqError as e:
        print(f"perplexity: error: {e.one_line()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
