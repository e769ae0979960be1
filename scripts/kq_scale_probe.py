"""Would a per-channel K/Q scale lower the error that the 2- and 4-bit pools put on attention scores?

Calibration text only (tuning data); a probe of an idea, not a runtime path. For any diagonal S,
q . k = (q / s) . (s * k), so the runtime could store s * K (after K centering, before the Hadamard
rotation) and attend with q / s at no cost in bits. A quantizer with one step per row spreads its error
evenly over the rotated channels, so the score error of a query is about |q / s|^2 * |s * k|^2 / 64 per
row, and s_i = (E[q_i^2] / E[k_i^2])^(1/4) minimises its mean (Cauchy-Schwarz); the ideal gain is
G = sum E[k^2] * sum E[q^2] / (sum sqrt(E[q^2] E[k^2]))^2 per KV head.

Scales are fitted per layer and KV head on the first --fit-chunks chunks of the text (post-RoPE queries
of the head's query group; K centered by the shipped controller's k_center), once from plain K
statistics and once from K weighted by the attention each row receives (sinks, positions < 4,
excluded). On the held-out chunks of the KL probes (--kl-chunks from --kl-offset) every layer's K rows
are stored at 2 and 4 bits by the runtime's own round trip (plain rounding) with and without the scales,
and the score error (q/s) . (stored - exact) is measured on --queries sampled queries per chunk: its mean
square over all causal (query, key) pairs, and weighted by each query's f16 attention over keys at
positions >= 4 (the rows a policy would leave at low precision; sinks get bits anyway). Reported as
ratios scaled / unscaled, per layer and as a geometric mean over layers.

Usage: python scripts/kq_scale_probe.py CALIB_TXT [--fit-chunks 2] [--kl-chunks 4] --json OUT
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli.models import resolve  # noqa: E402
from kvq_cli.runtime.engine import Engine  # noqa: E402
from kvq_cli.runtime.kv import KvqOptions  # noqa: E402
from kvq_cli.train import ORACLE, _attention, calibration_chunks, oracle_assignment  # noqa: E402
from probe_common import (add_kl_args, chunk_log_probs, held_out_chunks, kl_of, run, shipped_controller,  # noqa: E402
                          write_json)

SINKS = 4


def _causal_attention(qh: np.ndarray, kh: np.ndarray, qpos: np.ndarray, kpos: np.ndarray) -> np.ndarray:
    return _attention(qh, kh, kpos[None, :] <= qpos[:, None], 1.0 / np.sqrt(kh.shape[1]))


def layer_rows(e: Engine, il: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    q, qpos = e.queries(il)
    k, _, kpos, _ = e.read_layer(il)
    return q, qpos, k, kpos


def fit_scales(e: Engine, chunks: list[list[int]], n_q: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(plain scales, attention-weighted scales [n_layer, n_embd_kv], ideal gain G [n_layer, n_head_kv])."""
    d = e.dims
    g, hd = d.n_head // d.n_head_kv, d.head_dim
    k2 = np.zeros((d.n_layer, d.n_head_kv, hd))
    kw2 = np.zeros_like(k2)
    q2 = np.zeros_like(k2)
    for c in chunks:
        e.set_assignment(np.full(len(c) * d.n_layer, 16, np.int32))
        e.clear_trace()
        e.decode(c, 0)
        for il in range(d.n_layer):
            q, qpos, k, kpos = layer_rows(e, il)
            qi = rng.choice(len(q), min(n_q, len(q)), replace=False)
            for h in range(d.n_head_kv):
                kh = k[:, h * hd:(h + 1) * hd].astype(np.float64)
                qh = q[qi][:, h * g:(h + 1) * g, :].reshape(-1, hd).astype(np.float64)
                p = _causal_attention(qh, kh, np.repeat(qpos[qi], g), kpos)
                w = p.sum(0)
                w[kpos < SINKS] = 0.0
                k2[il, h] += (kh[kpos >= 1] ** 2).sum(0)
                kw2[il, h] += (w[:, None] * kh ** 2).sum(0) / max(w.sum(), 1e-30)
                q2[il, h] += (q[:, h * g:(h + 1) * g, :].astype(np.float64) ** 2).sum((0, 1))

    def scales(kk: np.ndarray) -> np.ndarray:
        s = (q2 / np.maximum(kk, 1e-30)) ** 0.25
        return (s / np.exp(np.log(s).mean(-1, keepdims=True))).reshape(d.n_layer, -1)

    kn, qn = k2 / k2.sum(-1, keepdims=True), q2 / q2.sum(-1, keepdims=True)
    gain = 1.0 / np.sqrt(kn * qn).sum(-1) ** 2
    return scales(k2), scales(kw2), gain


def score_errors(e: Engine, chunk: list[int], arms: dict[str, np.ndarray], bits: int, n_q: int, rng) -> dict:
    """Per arm and layer (mean squared score error over causal pairs, attention-weighted over keys >= SINKS)."""
    d = e.dims
    g, hd = d.n_head // d.n_head_kv, d.head_dim
    e.set_assignment(np.full(len(chunk) * d.n_layer, 16, np.int32))
    e.clear_trace()
    e.decode(chunk, 0)
    out = {name: np.zeros((d.n_layer, 2)) for name in arms}
    for il in range(d.n_layer):
        q, qpos, k, kpos = layer_rows(e, il)
        qi = rng.choice(len(q), min(n_q, len(q)), replace=False)
        for name, sc in arms.items():
            s = sc[il]
            ks = k * s
            dk = e.roundtrip(bits, ks) - ks
            for h in range(d.n_head_kv):
                cs = slice(h * hd, (h + 1) * hd)
                qh = q[qi][:, h * g:(h + 1) * g, :].reshape(-1, hd) / s[cs]
                qp = np.repeat(qpos[qi], g)
                causal = kpos[None, :] <= qp[:, None]
                err = (qh @ dk[:, cs].T / np.sqrt(hd)) ** 2
                p = _causal_attention(qh.astype(np.float64), ks[:, cs].astype(np.float64), qp, kpos)
                out[name][il, 0] += (err * causal).sum() / causal.sum()
                out[name][il, 1] += (p * err)[:, kpos >= SINKS].sum(1).mean()
    return out


def decode_kl(model: Path, spec, chunks: list[list[int]], arms: dict[str, np.ndarray], a, t0: float) -> dict:
    """KL vs the unscaled all-f16 decode, per scale arm: every row at 4 bits, at 2 bits (window 0: rows
    are stored as they come, plain rounding), and oracle@budget with the q8_0 window of 128 (its rows
    leave the window with the runtime's query-aware rounding; the allocation is from plain-rounding
    damage, as `kvq eval`'s oracle). K centered by the shipped controller's k_center throughout."""
    out: dict[str, dict] = {}
    refs = None
    for name, sc in arms.items():
        for arm, window, wbits in (("q4", 0, 16), ("2bit", 0, 16), (f"oracle@{a.budget:g}", 128, 8)):
            with Engine(model, kv=ORACLE, n_ctx=a.kl_len, n_batch=a.kl_len, n_ubatch=32,
                        kvq=KvqOptions(window=window, window_bits=wbits, record_q=True, per_layer=True)) as e:
                e.set_k_center(np.asarray(spec.k_center, np.float32))
                e.set_k_scale(None if name == "none" else sc)
                if refs is None:
                    refs = []
                    for c in chunks:
                        e.set_assignment(np.zeros(0, np.int32))
                        refs.append(chunk_log_probs(e, c, len(c) // 2))
                kls, bits = [], []
                for c, ref in zip(chunks, refs):
                    if arm.startswith("oracle"):
                        oracle_assignment(e, c, a.budget)
                    else:
                        e.set_assignment(np.full(len(c) * e.dims.n_layer, 4 if arm == "q4" else 2, np.int32))
                    kls.append(kl_of(ref, chunk_log_probs(e, c, len(c) // 2)))
                    bits.append(float(e.kv_stats().bits_per_elem))
            out[f"{arm}/{name}"] = {"mean": float(np.mean(kls)), "chunks": kls, "bits": bits}
            print(f"{arm}, scales {name}: KL {np.mean(kls):.4f} bits {np.mean(bits):.3f} ({time.time() - t0:.0f}s)",
                  flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    ap.add_argument("--fit-chunks", type=int, default=2)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--kl", action="store_true", help="also decode the held-out chunks with the scales in the runtime "
                    "(llama_kvq_set_k_scale): KL vs f16 of every row at 4 bits, at 2 bits, and oracle@--budget")
    add_kl_args(ap, kl_chunks=4)
    a = ap.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(0)
    spec = shipped_controller()
    text = Path(a.calib).read_text(encoding="utf-8", errors="replace")
    model = resolve(None).path
    with Engine(model, kv=ORACLE, n_ctx=a.kl_len, n_batch=a.kl_len, n_ubatch=512,
                kvq=KvqOptions(window=0, record_q=True, per_layer=True)) as e:
        e.set_k_center(np.asarray(spec.k_center, np.float32))
        chunks = held_out_chunks(e, text, a)
        fit = calibration_chunks(e, text, a.kl_len, a.fit_chunks)
        if a.fit_chunks * a.kl_len > a.kl_offset:
            raise ValueError("the fit chunks overlap the held-out chunks (--kl-offset)")
        s_plain, s_att, gain = fit_scales(e, fit, 512, rng)
        arms = {"none": np.ones_like(s_plain), "plain": s_plain, "attention": s_att}
        res = {}
        for bits in (2, 4):
            tot = {n: np.zeros((e.dims.n_layer, 2)) for n in arms}
            for c in chunks:
                for n, v in score_errors(e, c, arms, bits, a.queries, rng).items():
                    tot[n] += v
            for n in ("plain", "attention"):
                r = tot[n] / tot["none"]
                res[f"{bits}bit/{n}"] = {
                    "all_pairs_ratio": float(np.exp(np.log(r[:, 0]).mean())),
                    "attention_weighted_ratio": float(np.exp(np.log(r[:, 1]).mean())),
                    "per_layer_all_pairs": r[:, 0].round(4).tolist(),
                    "per_layer_attention_weighted": r[:, 1].round(4).tolist()}
                print(f"{bits} bits, {n} scales: score error x{res[f'{bits}bit/{n}']['all_pairs_ratio']:.3f} "
                      f"(all pairs), x{res[f'{bits}bit/{n}']['attention_weighted_ratio']:.3f} "
                      f"(attention-weighted, keys >= {SINKS}) ({time.time() - t0:.0f}s)", flush=True)
        kl = decode_kl(model, spec, chunks, arms, a, t0) if a.kl else None
    out = {"command": " ".join(["python", "scripts/kq_scale_probe.py"] + sys.argv[1:]), "model": model.name,
           "ideal_gain_geomean": float(np.exp(np.log(gain).mean())),
           "ideal_gain_per_layer": gain.mean(1).round(3).tolist(), "ratios": res,
           **({"kl": kl} if kl else {}), "seconds": time.time() - t0}
    print(f"ideal gain G (geometric mean over layers and KV heads): {out['ideal_gain_geomean']:.3f}")
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
