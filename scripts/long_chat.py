#!/usr/bin/env python3
"""A chat driven far past its context: it keeps answering, and resident memory stays flat.

Usage: .venv/bin/python scripts/long_chat.py [--model M] [--kv adaptive@3] [--ctx 2048] [--tokens 20000]
       [--max-tokens 64] [--json OUT]

kvq's ChatSession (what `kvq chat` runs) on one Engine, asking questions of its own, sampling at
temperature 0.7, until --tokens tokens were decoded; the context shifts whenever it fills. Prints the
shifts, replies (and empty ones), and the process's RSS after the first shift, at its largest after
that, and at the end.
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
from kvq_cli.eval.shift import long_chat  # noqa: E402
from kvq_cli.models.registry import embedded_path, model_ref, resolve  # noqa: E402
from kvq_cli.runtime.engine import Engine  # noqa: E402
from kvq_cli.runtime.kv import parse_kv  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--kv", default="adaptive@3")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    policy = parse_kv(a.kv)
    ref = model_ref(resolve(a.model or str(embedded_path())), [policy])
    cmd = "python scripts/long_chat.py " + " ".join(sys.argv[1:])
    day = time.strftime('%Y-%m-%d', time.gmtime())
    print(f"# {cmd}\n# {day}, {machine_summary()}", flush=True)
    t0 = time.monotonic()
    with Engine(ref, kv=policy, n_ctx=a.ctx, n_threads=a.threads) as e:
        r = long_chat(e, a.tokens, max_tokens=a.max_tokens,
                      on_turn=lambda t, n: print(f"# turn {t}: {n} tokens", file=sys.stderr, flush=True) if t % 25 == 0 else None)
    secs = time.monotonic() - t0
    flat = r.rss_max_mib - r.rss_after_first_shift_mib
    print(f"{r.tokens} tokens in {r.turns} turns ({secs:.0f} s), {r.shifts} shifts of a {r.n_ctx}-token context, "
          f"{r.empty_replies} empty replies; RSS after the first shift {r.rss_after_first_shift_mib:.1f} MiB, "
          f"largest after it {r.rss_max_mib:.1f} MiB (+{flat:.1f}), at the end {r.rss_last_mib:.1f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": cmd, "date": day, "machine": machine_summary(), "kv": a.kv,
                                            "seconds": round(secs, 1), **asdict(r)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
