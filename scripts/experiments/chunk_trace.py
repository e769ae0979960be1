"""Where one wikitext-2 chunk's KL comes from: a diagnosis of `kvq eval --task wikitext2` rows, not a tuning tool.

Decodes chunk C of the text as `kvq eval --task wikitext2 --tokens N --ppl-ctx L` does (the same tokens,
32-token ubatches for policies with a window, stock f16 as the reference) with each policy, records every
precision decision (KvqOptions(trace=True)), and reports per policy the chunk's mean KL vs stock f16 on
its scored half, the share of that KL in the 10 worst positions, and per layer the share of decided
rows at each precision.

Usage: python scripts/chunk_trace.py --data DIR --chunk C --kv adaptive@6[,rule@5...] [--model GGUF]
       [--tokens 16384] [--ppl-ctx 2048] --json OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.train.oracle import log_softmax as _log_softmax  # noqa: E402
from kvq_cli.models.registry import model_ref, resolve  # noqa: E402
from kvq_cli.runtime.inspector import Inspector  # noqa: E402
from kvq_cli.runtime.kv import KvqOptions, parse_kv  # noqa: E402
from kvq_cli.eval.tasks import load_text  # noqa: E402
from probe_common import run, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--chunk", type=int, required=True)
    ap.add_argument("--kv", required=True)
    ap.add_argument("--model", default=None, help="GGUF with a controller (default: the embedded model + the shipped one)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ppl-ctx", type=int, default=2048)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    policies = [parse_kv("stock-f16")] + [parse_kv(k) for k in a.kv.split(",")]
    if any(p.is_stock for p in policies[1:]):
        raise ValueError("--kv takes kvq policies (stock f16 is the reference)")
    path = Path(a.model) if a.model else model_ref(resolve(None), policies)
    text = load_text(a.data, "wikitext2", "test")
    n, half = a.ppl_ctx, a.ppl_ctx // 2
    out = {"command": "python scripts/chunk_trace.py " + " ".join(sys.argv[1:]), "model": path.name,
           "chunk": a.chunk, "policies": {}}
    ref = None
    for p in policies:
        windowed = not p.is_stock and KvqOptions().window_for(p) > 0   # as kvq eval: decisions after each ubatch
        with Inspector(path, kv=p, n_ctx=n, n_batch=n, n_ubatch=32 if windowed else 512,
                    kvq=KvqOptions(trace=not p.is_stock)) as e:
            toks = e.tokenize(text)[:a.tokens]
            if len(toks) < (a.chunk + 1) * n:
                raise ValueError(f"the text has {len(toks)} tokens, fewer than chunk {a.chunk} of {n} needs")
            chunk = toks[a.chunk * n:(a.chunk + 1) * n]
            lp = _log_softmax(e.decode(chunk[:-1], 0, logits_from=half - 1).astype(np.float64))
            if ref is None:
                ref = lp
                continue
            tr, st = e.trace(), e.kv_stats()
        kl = (np.exp(ref) * (ref - lp)).sum(-1)
        worst = np.argsort(-kl)[:10]
        layers = sorted(set(tr.layer.tolist()))
        share = {str(il): {str(b): float(np.mean(tr.bits[tr.layer == il] == b)) for b in sorted(set(tr.bits.tolist()))}
                 for il in layers}
        out["policies"][p.name] = {"kl": float(kl.mean()), "bits_per_elem": st.bits_per_elem, "rows": st.rows,
                                   "worst10_share": float(kl[worst].sum() / kl.sum()),
                                   "worst10_positions": [int(i) + half for i in worst], "layer_share": share}
        two = {il: v.get("2", 0.0) for il, v in share.items()}
        top = sorted(two, key=two.get, reverse=True)[:3]
        print(f"{p.name}: KL {kl.mean():.4f} at {st.bits_per_elem:.2f} bits; 10 worst positions {100 * kl[worst].sum() / kl.sum():.0f}% "
              f"of it; most 2-bit rows in layers " + ", ".join(f"{il} ({100 * two[il]:.0f}%)" for il in top))
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
