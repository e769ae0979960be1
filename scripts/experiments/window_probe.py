"""Does the window W that adaptive@B decides behind change its KL at the same bits?

Calibration text only (tuning data). The window is paid for in the budget (W rows at its precision
at full context), so a smaller W leaves more bits for the decided rows, while a larger one lets the
controller's features see more queries. For each held-out calibration chunk (the chunks of
objective_probe.py / online_probe.py), KL of the second half vs the all-f16 decode (oracle engine,
every row f16, the controller's K centering) of the runtime's online adaptive@B decode with each W
(32-token ubatches, as `kvq eval --task wikitext2` runs it), and the bits it held.

With --qar-mu (a comma list) each window is run with each weight of query-aware rounding
(KvqOptions.qar_mu; 0 is plain rounding), the arms named adaptive@B/W=w/qar=mu. With --window-bits
(a comma list of 16 and 8) each with the window rows at that precision (KvqOptions.window_bits; 8 is
q8_0), the arms named adaptive@B/W=w[/qar=mu]/wb=b. The reference stays the f16 oracle engine.

Each arm also records the token-layer rows per class (window, f16, q8, q4, k4v2, q2, drop) at the end of
each chunk and their share over all chunks (`rows`, `pool_share`).

Usage: python scripts/window_probe.py CALIB_TXT [--windows 8,16,32,64] [--budgets 3] [--qar-mu 0,0.25]
       [--window-bits 16,8] --json OUT
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.models.registry import model_ref, resolve  # noqa: E402
from kvq_cli.runtime.engine import as_model_ref  # noqa: E402
from kvq_cli.runtime.inspector import Inspector  # noqa: E402
from kvq_cli.runtime.kv import KvqOptions, parse_kv  # noqa: E402
from kvq_cli.train.oracle import ORACLE  # noqa: E402
from probe_common import (add_kl_args, chunk_log_probs, f16_reference, held_out_chunks, kl_of, run,  # noqa: E402
                          write_json)


def pool_share(rows: list[dict[str, int]]) -> dict[str, float]:
    """Share of the token-layer rows in each class, summed over chunks (window included)."""
    tot = {c: sum(r.get(c, 0) for r in rows) for c in rows[0]} if rows else {}
    n = sum(tot.values())
    return {c: v / n for c, v in tot.items()} if n else {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    ap.add_argument("--windows", default="8,16,32,64")
    ap.add_argument("--budgets", default=None, help="comma list (default: --budget)")
    ap.add_argument("--qar-mu", default=None, help="comma list of query-aware rounding weights (default: the runtime's)")
    ap.add_argument("--window-bits", default=None, help="comma list of window precisions, 16 and/or 8 (default: the policy's)")
    ap.add_argument("--model", default=None, help="GGUF with a controller (default: the embedded model + the shipped controller)")
    add_kl_args(ap, kl_chunks=4)
    a = ap.parse_args()
    t0 = time.time()
    windows = [int(w) for w in a.windows.split(",")]
    mus = [float(m) for m in a.qar_mu.split(",")] if a.qar_mu else [None]
    wbits = [int(b) for b in a.window_bits.split(",")] if a.window_bits else [None]
    budgets = [float(b) for b in (a.budgets or str(a.budget)).split(",")]
    policies = [parse_kv(f"adaptive@{b:g}") for b in budgets]
    path = Path(a.model) if a.model else model_ref(resolve(None), policies)
    spec = as_model_ref(path).controller_spec()
    if spec is None:
        raise ValueError(f"{path} carries no controller")
    text = Path(a.calib).read_text(encoding="utf-8", errors="replace")
    kl: dict[str, list[float]] = {}
    bits_seen: dict[str, list[float]] = {}
    rows_seen: dict[str, list[dict[str, int]]] = {}   # token-layer rows per class at each chunk's end
    with Inspector(path, kv=ORACLE, n_ctx=a.kl_len, n_batch=a.kl_len, n_ubatch=32,
                kvq=KvqOptions(window=32)) as e:
        e.set_k_center(np.asarray(spec.k_center, np.float32))
        chunks = held_out_chunks(e, text, a)
        refs = [f16_reference(e, c) for c in chunks]
    for b, pol in zip(budgets, policies):
        for w, mu, wb in ((w, mu, wb) for w in windows for mu in mus for wb in wbits):
            name = (f"adaptive@{b:g}/W={w}" + (f"/qar={mu:g}" if mu is not None else "")
                    + (f"/wb={wb}" if wb is not None else ""))
            with Inspector(path, kv=pol, n_ctx=a.kl_len, n_batch=a.kl_len, n_ubatch=32,
                        kvq=KvqOptions(window=w, qar_mu=mu, window_bits=wb)) as live:
                for c, ref_lp in zip(chunks, refs):
                    lp = chunk_log_probs(live, c, len(c) // 2)
                    kl.setdefault(name, []).append(kl_of(ref_lp, lp))
                    st = live.kv_stats()
                    bits_seen.setdefault(name, []).append(float(st.bits_per_elem))
                    rows_seen.setdefault(name, []).append(dict(st.rows or {}))
            print(f"{name}: KL {np.mean(kl[name]):.4f} bits {np.mean(bits_seen[name]):.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    out = {"command": " ".join(["python", "scripts/window_probe.py"] + sys.argv[1:]), "model": path.name,
           "kl": {k: {"mean": float(np.mean(v)), "chunks": v, "bits": bits_seen[k], "rows": rows_seen[k],
                      "pool_share": pool_share(rows_seen[k])} for k, v in kl.items()},
           "seconds": time.time() - t0}
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
