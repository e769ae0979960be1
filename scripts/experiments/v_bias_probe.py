"""Does a 2-bit V cache shrink the attention output? (issue 7, calibration text only)

    python scripts/v_bias_probe.py CALIB_TXT --json OUT [--kl-chunks 2] [--kl-len 1024]

Each held-out calibration chunk (the chunks of window_probe.py, shorter) is decoded at f16 with every
query recorded. Per layer and query head, the exact attention (queries at positions >= 256, K exact)
is applied to the layer's V rows (1) as stored at f16, (2) round-tripped at 2 bits with the
least-squares block step (Engine.roundtrip, what the pool stored before v_unbias) and (3) the same
with each head's block rescaled by |v|^2 / <v, v^> (what v_unbias stores; kvq2's block is one head of
the rotated row, so the rescale is the same in either space, up to the f16 rounding of the step).
Position 0 (the attention sink, which the policies keep above 2 bits) stays exact. Reported per
layer: the relative squared error of the output, sum |do|^2 / sum |o|^2, and its bias along the
output, sum <do, o> / sum |o|^2 (-0.11 is the output shrunk by 11%).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvq_cli.models.registry import embedded_path  # noqa: E402
from kvq_cli.runtime.inspector import Inspector  # noqa: E402
from kvq_cli.runtime.kv import KvPolicy, KvqOptions  # noqa: E402
from kvq_cli.train.damage import _attention  # noqa: E402
from probe_common import held_out_chunks, run, write_json  # noqa: E402

HD = 64
Q_FROM = 256


def unbiased(v: np.ndarray, vh: np.ndarray, n_head_kv: int) -> np.ndarray:
    """vh with each head rescaled so that its projection on v is exact."""
    a, b = v.reshape(len(v), n_head_kv, HD), vh.reshape(len(v), n_head_kv, HD)
    num, den = (a * a).sum(-1, keepdims=True), (a * b).sum(-1, keepdims=True)
    return (b * np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)).reshape(v.shape)


def layer_stats(e: Inspector, il: int) -> dict[str, list[float]]:
    """{variant: [sum |do|^2, sum <do, o>, sum |o|^2]} of layer il over its query heads."""
    d = e.dims
    q, qpos = e.queries(il)
    k, v, kpos, _ = e.read_layer(il)
    plain = e.roundtrip(2, v)
    variants = {"least_squares": plain, "unbiased": unbiased(v, plain, d.n_head_kv)}
    for x in variants.values():
        x[kpos == 0] = v[kpos == 0]
    causal = qpos[:, None] >= kpos[None, :]
    sel = qpos >= Q_FROM
    out = {name: [0.0, 0.0, 0.0] for name in variants}
    for h in range(d.n_head):
        g = h // (d.n_head // d.n_head_kv)   # the query head's KV head
        s = slice(g * HD, (g + 1) * HD)
        a = _attention(q[:, h], k[:, s], causal, 1.0 / np.sqrt(HD))[sel]
        o = a @ v[:, s]
        for name, x in variants.items():
            do = a @ x[:, s] - o
            out[name] = [t + float(u) for t, u in zip(out[name], ((do * do).sum(), (do * o).sum(), (o * o).sum()))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("calib")
    ap.add_argument("--kl-chunks", type=int, default=2)
    ap.add_argument("--kl-len", type=int, default=1024)
    ap.add_argument("--kl-offset", type=int, default=100_000)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    if a.kl_chunks < 1 or a.kl_len <= Q_FROM:
        raise ValueError(f"need --kl-chunks >= 1 and --kl-len > {Q_FROM}")
    text = Path(a.calib).read_text()
    t0 = time.time()
    with Inspector(embedded_path(), kv=KvPolicy("f16", kvq="static"), n_ctx=a.kl_len, n_batch=a.kl_len,
                kvq=KvqOptions(window=0, k_center=False, record_q=True)) as e:
        n_layer = e.dims.n_layer
        tot: dict[str, np.ndarray] = {}
        for c in held_out_chunks(e, text, a):
            e.decode(c, 0)
            for il in range(n_layer):
                for name, t in layer_stats(e, il).items():
                    tot.setdefault(name, np.zeros((n_layer, 3)))[il] += t
    res = {name: {"rel_err": (t[:, 0] / t[:, 2]).tolist(), "bias": (t[:, 1] / t[:, 2]).tolist(),
                  "rel_err_mean": float((t[:, 0] / t[:, 2]).mean()), "bias_mean": float((t[:, 1] / t[:, 2]).mean())}
           for name, t in tot.items()}
    for name, r in res.items():
        print(f"{name}: relative squared error {r['rel_err_mean']:.4f}, bias along the output {r['bias_mean']:+.4f} "
              f"(mean over {n_layer} layers)")
    write_json(a.json, {"command": "python " + " ".join(sys.argv), "chunks": a.kl_chunks, "chunk_len": a.kl_len,
                        "q_from": Q_FROM, "seconds": round(time.time() - t0, 1), **res})
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
