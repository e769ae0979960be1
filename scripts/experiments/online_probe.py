"""Why can a controller that allocates better globally decode worse online?

Calibration text only (tuning data). For each controller (a GGUF with it embedded, `kvq train
--embed`) and each held-out calibration chunk (--kl-chunks chunks of --kl-len tokens from token
--kl-offset, the chunks of objective_probe.py), KL of the second half vs the all-f16 decode
(oracle engine, every row f16, the controller's K centering) of:
  online       the runtime's adaptive@B decode (W = 32, 32-token ubatches, the online price per
               bit that steers it to B), as `kvq eval --task wikitext2` runs it
  replay       the online decode's own decisions (its trace) installed on the oracle engine:
               must equal online (a check that the two engines store rows alike)
  global_live  the controller's predicted damage on the online decode's features, allocated
               globally over the chunk at B bits (the final window at f16, as oracle@B)
  global_f16   the same on the features of the all-f16 decode (what objective_probe.py measured)
  oracle       the true first-order damage of the all-f16 decode, allocated globally
online vs global_live isolates the online price; global_live vs global_f16 the drift of the
features when earlier rows are stored quantized.

Usage: python scripts/online_probe.py CALIB_TXT --gguf NAME=PATH [--gguf ...] --json OUT
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.controller.spec import controller_from_reader  # noqa: E402
from kvq_cli.gguf.read import read_gguf  # noqa: E402
from kvq_cli.runtime.inspector import Inspector  # noqa: E402
from kvq_cli.runtime.kv import KvqOptions, parse_kv  # noqa: E402
from kvq_cli.train.damage import EFF_BITS, PRECISIONS, engine_layer_damage  # noqa: E402
from kvq_cli.train.oracle import allocate  # noqa: E402
from probe_common import (add_kl_args, allocation_kl, chunk_log_probs, controller_damage, kl_of,  # noqa: E402
                          oracle_refs, run, write_json)

W = 32


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    ap.add_argument("--gguf", action="append", required=True, help="NAME=PATH of a GGUF with a controller")
    add_kl_args(ap, kl_chunks=3)
    a = ap.parse_args()
    t0 = time.time()
    arms = dict(g.split("=", 1) for g in a.gguf)
    specs = {n: controller_from_reader(read_gguf(p)) for n, p in arms.items()}
    k_center = next(iter(specs.values())).k_center
    if any(s.k_center != k_center for s in specs.values()):
        raise ValueError("the controllers must share one K centering (trained on the same cache)")
    text = Path(a.calib).read_text(encoding="utf-8", errors="replace")
    kl: dict[str, list[float]] = {"oracle": []}
    bits_seen: dict[str, list[float]] = {"oracle": []}
    agree: dict[str, list[float]] = {}   # share of decided rows where online and global_live choose alike
    opts = KvqOptions(window=W, trace=True, per_layer=True, record_q=True)
    for e, ci, c, ref_lp in oracle_refs(text, a, opts, k_center):
        n, half, n_layer = len(c), len(c) // 2, e.dims.n_layer
        tr = e.trace()
        sel = tr.pos < n - W
        pos, lay = tr.pos[sel], tr.layer[sel]
        true = np.zeros((len(pos), 4))
        for il in range(n_layer):
            dm, _, kpos = engine_layer_damage(e, il, W)
            at = {int(p_): i for i, p_ in enumerate(kpos)}
            m_ = lay == il
            true[m_, :3] = dm[[at[int(p_)] for p_ in pos[m_]]]
        per_row = (a.budget * n - EFF_BITS[-1] * W) / (n - W)
        k_, b_ = allocation_kl(e, c, half, ref_lp, true, pos, lay, per_row, n_layer)
        kl["oracle"].append(k_)
        bits_seen["oracle"].append(b_)
        for name, path in arms.items():
            spec = specs[name]
            with Inspector(path, kv=parse_kv(f"adaptive@{a.budget:g}"), n_ctx=a.kl_len, n_batch=a.kl_len, n_ubatch=32,
                        kvq=KvqOptions(window=W, trace=True)) as live:
                lp = chunk_log_probs(live, c, half)
                ltr = live.trace()
                got = {"online": (kl_of(ref_lp, lp), float(live.kv_stats().bits_per_elem))}
            lsel = ltr.pos < n - W
            bits = np.full((n, n_layer), 16, np.int32)
            bits[ltr.pos[lsel], ltr.layer[lsel]] = ltr.bits[lsel]
            e.set_assignment(bits.reshape(-1))
            got["replay"] = (kl_of(ref_lp, chunk_log_probs(e, c, half)), float(e.kv_stats().bits_per_elem))
            xl = ltr.features[lsel][:, [ltr.names.index(f) for f in spec.features]]
            got["global_live"] = allocation_kl(e, c, half, ref_lp, controller_damage(spec, xl), ltr.pos[lsel],
                                               ltr.layer[lsel], per_row, n_layer)
            xf = tr.features[sel][:, [tr.names.index(f) for f in spec.features]]
            got["global_f16"] = allocation_kl(e, c, half, ref_lp, controller_damage(spec, xf), pos, lay, per_row,
                                              n_layer)
            # how often the online decisions are the global allocation's on the same features
            glob = np.full((n, n_layer), 16, np.int32)
            glob[ltr.pos[lsel], ltr.layer[lsel]] = np.asarray(PRECISIONS)[
                allocate(controller_damage(spec, xl), per_row)]
            agree.setdefault(name, []).append(float((glob == bits)[:n - W].mean()))
            for k2, (v, b) in got.items():
                kl.setdefault(f"{name}.{k2}", []).append(v)
                bits_seen.setdefault(f"{name}.{k2}", []).append(b)
        print(f"chunk {ci + 1}/{a.kl_chunks} " + " ".join(f"{k_}={v[-1]:.4f}" for k_, v in kl.items())
              + f" {time.time() - t0:.0f}s", flush=True)
    out = {"command": " ".join(["python", "scripts/online_probe.py"] + sys.argv[1:]), "budget": a.budget,
           "kl": {k_: {"mean": float(np.mean(v)), "chunks": v, "bits": bits_seen[k_]} for k_, v in kl.items()},
           "agreement_online_global_live": {k_: float(np.mean(v)) for k_, v in agree.items()},
           "seconds": time.time() - t0}
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
