"""Oracle damage: what storing a row at each precision does to the attention output of later queries.

For each (token, layer) and each precision p in {2, 4, 8} the rows are stored and decoded exactly as
the pool would (llama_kvq_roundtrip / llama_kvq_roundtrip_v through the Inspector), and the
first-order change of the attention output that the *later* queries (those past the window) would
see is measured. Per query q and head, with a the attention weight of the token, s = q.dK * scale:
    do_q = a * (dV + s * (V - o_q))            (softmax derivative)
damage = mean over those queries of sum over heads |do_q|^2, divided by the layer's mean |o_q|^2
(relative output error, so layers are comparable). f16 costs 0. With a V weight w (controller.spec.V_WEIGHT, 10, by
default) dV enters scaled by sqrt(w): the first-order damage undervalues V errors.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from kvq_cli.controller.spec import EFF_BITS_OF
from kvq_cli.runtime.inspector import Inspector

PRECISIONS = (2, 4, 8, 16)                   # the controller's classes

EFF_BITS = np.array([EFF_BITS_OF[p] for p in PRECISIONS])   # bits/element of each, block scales included

SIDE_BITS = {3: (4, 2)}                      # pools whose K and V sides differ: bits -> (K bits, V bits)


def costs_of(precisions: tuple[int, ...]) -> np.ndarray:
    """Effective bits/element of each pool of `precisions`."""
    return np.array([EFF_BITS_OF[p] for p in precisions])



def roundtrip_deltas(engine: Inspector, x: np.ndarray, side: int = 0,
                     precisions: tuple[int, ...] = PRECISIONS) -> list[np.ndarray]:
    """x stored by each pool of `precisions` but the last (f16) minus x: what the pools do to
    these rows, K rows (side 0) or V rows (side 1), with plain (least-squares) block scales;
    a k4v2 pool round-trips K at 4 bits, V at 2."""
    bits = [SIDE_BITS.get(p, (p, p))[side] for p in precisions[:-1]]
    done = {b: engine.roundtrip(b, x) - x for b in dict.fromkeys(bits)}
    return [done[b] for b in bits]


def _attention(qh: np.ndarray, kg: np.ndarray, causal: np.ndarray, scale: float) -> np.ndarray:
    """Causal softmax attention weights [n_q, n_keys] of one head's queries over its K rows."""
    s = np.where(causal, qh @ kg.T * scale, -np.inf)
    s -= s.max(1, keepdims=True)
    a = np.exp(s)
    a /= a.sum(1, keepdims=True)
    return a


def _drop_damage(qh: np.ndarray, kg: np.ndarray, vg: np.ndarray, causal: np.ndarray, counted: np.ndarray,
                 scale: float) -> np.ndarray:
    """Per key, the summed |change|^2 of one head's attention output over the counted queries when the
    key is left out: a (o - V) / (1 - a) = a (o_rest - V) for its weight a, o_rest the output of the
    other keys. Exact. A query's key with a > 1/2 (at most one) takes o_rest from the other keys'
    weights directly, since o - V and 1 - a both vanish as a nears 1."""
    qh, kg, vg = (x.astype(np.float64) for x in (qh, kg, vg))
    a = _attention(qh, kg, causal, scale)
    o = a @ vg
    light = counted & (a <= 0.5)
    gap = np.maximum((vg * vg).sum(1)[None, :] - 2 * (o @ vg.T) + (o * o).sum(1)[:, None], 0.0)
    r = np.divide(a, 1.0 - a, out=np.zeros_like(a), where=light)
    out = (r * r * gap).sum(0)
    qi, ti = np.nonzero(counted & ~light)
    if len(qi):
        rest = a[qi].copy()
        rest[np.arange(len(qi)), ti] = 0.0
        o_rest = (rest @ vg) / rest.sum(1, keepdims=True)
        np.add.at(out, ti, a[qi, ti] ** 2 * ((o_rest - vg[ti]) ** 2).sum(1))
    return out


def layer_damage(q: np.ndarray, qpos: np.ndarray, k: np.ndarray, v: np.ndarray, kpos: np.ndarray,
                 dks: list[np.ndarray], dvs: list[np.ndarray], window: int, q_stride: int = 2, q_from: int = 0,
                 span: str = "later", drop: bool = False):
    """Relative first-order attention-output damage [n_keys, len(dks)] of one layer, and the count of later queries.

    q: [n_q, n_head, hd] (post-RoPE), k/v: [n_keys, n_head_kv * hd], dks/dvs: per precision the
    change of k/v (the pools' 2, 4, 8 bits; scripts/pool_candidates.py passes other pairs).
    Only queries past each key's window (qpos > kpos + window) and at positions >= q_from count;
    with span "window", the queries inside it instead (kpos < qpos <= kpos + window: the ones a
    causal policy has seen when the row leaves the window; scripts/window_damage_probe.py).
    With `drop`, one more column: the damage of leaving the row out (its weight a moves the output
    by a (o - V) / (1 - a); scripts/eviction_probe.py).
    """
    n_q, n_head, hd = q.shape
    n_head_kv = k.shape[1] // hd
    group = n_head // n_head_kv
    scale = 1.0 / math.sqrt(hd)
    sel = np.arange(0, n_q, q_stride)
    q, qpos = q[sel], qpos[sel]
    causal = qpos[:, None] >= kpos[None, :]
    later = (qpos[:, None] > kpos[None, :] + window) & (qpos[:, None] >= q_from)
    if span not in ("later", "window"):
        raise ValueError(f"span must be later or window, got {span}")
    if span == "window":
        later = (qpos[:, None] > kpos[None, :]) & ~later & (qpos[:, None] >= q_from)
    n_later = later.sum(0)
    # the damage sums run over the queries that count for some key (in the prompt regime the
    # continuation's only); every query's output enters the layer's mean |o|^2
    counts = later.any(1)
    later_c = later[counts]
    dmg = np.zeros((k.shape[0], len(dks) + drop), np.float64)
    out_sq = 0.0
    for g in range(n_head_kv):
        cols = slice(g * hd, (g + 1) * hd)
        kg, vg = k[:, cols], v[:, cols]
        vv = (vg * vg).sum(1)
        for j in range(group):
            qh_all = q[:, g * group + j]
            a_all = _attention(qh_all, kg, causal, scale)
            o_all = a_all @ vg
            out_sq += (o_all * o_all).sum(1).mean()
            qh, a, o = qh_all[counts], a_all[counts], o_all[counts]
            oo = (o * o).sum(1)
            a2 = np.where(later_c, a * a, 0.0)
            vo = o @ vg.T
            for p, (dk, dv) in enumerate(zip(dks, dvs)):
                dkg, dvg = dk[:, cols], dv[:, cols]
                sd = qh @ dkg.T * scale
                term = ((dvg * dvg).sum(1)[None, :] + 2 * sd * ((dvg * vg).sum(1)[None, :] - o @ dvg.T)
                        + sd * sd * (vv[None, :] - 2 * vo + oo[:, None]))
                dmg[:, p] += (a2 * term).sum(0)
            if drop:
                dmg[:, -1] += _drop_damage(qh_all, kg, vg, causal, later, scale)
    dmg /= np.maximum(n_later, 1)[:, None]
    dmg /= out_sq / n_head
    return dmg, n_later


def engine_layer_damage(e: Inspector, il: int, window: int, precisions: tuple[int, ...] = PRECISIONS,
                        v_weight: float = 1.0, **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """layer_damage of the rows held for layer il on an oracle engine (record_q), with the pools'
    own round trips: (damage [n_keys, len(precisions) - 1], later-query counts, key positions).
    With v_weight w, the V errors enter scaled by sqrt(w), so the V part of the damage weighs w times."""
    q, qpos = e.queries(il)
    k, v, kpos, _ = e.read_layer(il)
    drop = precisions[0] == 0   # eviction: layer_damage's extra last column, moved to the front
    stored = precisions[drop:]
    dvs = roundtrip_deltas(e, v, 1, stored)
    if v_weight != 1.0:
        dvs = [dv * math.sqrt(v_weight) for dv in dvs]
    d, n_later = layer_damage(q, qpos, k, v, kpos, roundtrip_deltas(e, k, 0, stored), dvs, window, drop=drop, **kw)
    if drop:
        d = np.concatenate([d[:, -1:], d[:, :-1]], 1)
    return d, n_later, kpos


def decided_damage(e: Inspector, n: int, window: int, precisions: tuple[int, ...] = PRECISIONS,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """engine_layer_damage of every layer's decided rows (position < n - window) of the last decode of n
    tokens, stacked layer after layer: (damage [rows, len(precisions) - 1], positions, layers)."""
    return decided_rows(e, n, window, lambda il: engine_layer_damage(e, il, window, precisions)[::2])


def decided_rows(e: Inspector, n: int, window: int, layer_fn: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """layer_fn(il) -> (values [n_keys, ...], key positions) of each layer, kept for the decided rows
    (position < n - window) of the last decode of n tokens and stacked layer after layer: (values,
    positions, layers)."""
    dm, pos, lay = [], [], []
    for il in range(e.dims.n_layer):
        d, kpos = layer_fn(il)
        sel = kpos < n - window
        dm.append(d[sel])
        pos.append(kpos[sel])
        lay.append(np.full(int(sel.sum()), il))
    return np.concatenate(dm), np.concatenate(pos), np.concatenate(lay)
