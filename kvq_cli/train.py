"""Train stage: a precision controller learned from the runtime's oracle on calibration text.

1. Collect. The calibration text is cut into chunks; each chunk is decoded by the patched
   runtime with every row kept at f16 (oracle policy), the decode-time window W and small
   ubatches, recording per (token, layer) the features the runtime computes when a token
   leaves the window (trace), every query row, and the K/V rows.
2. Damage. For each (token, layer) and each precision p in {2, 4, 8} (--pools 2,3,4,8,16: also
   3, the k4v2 pool, whose K takes the 4-bit change and V the 2-bit one) the rows are stored and
   decoded exactly as the pool would (llama_kvq_roundtrip; with --damage-rounding qar, K as the
   runtime's query-aware rounding stores it, llama_kvq_roundtrip_qar; with --damage-v-scales unbiased,
   V as the runtime's v_unbias stores it, llama_kvq_roundtrip_v), and the first-order change of
   the attention output that the *later* queries (those past the f16 window) would see is
   measured. Per query q and head, with a the attention weight of the token, s = q.dK * scale:
       do_q = a * (dV + s * (V - o_q))            (softmax derivative)
   damage = mean over those queries of sum over heads |do_q|^2, divided by the layer's mean
   |o_q|^2 (relative output error, so layers are comparable). f16 costs 0. With --v-weight w
   (V_WEIGHT, 10, by default) dV enters scaled by sqrt(w): the first-order damage undervalues V errors.
3. Fit (--objective damage, the default). A tiny MLP (features -> hidden ReLU -> one output
   per precision) regresses each row's damage at 2/4/8 bits (MSE on damage divided by the
   mean 2-bit damage; held-out rows for early stopping; deterministic for a seed). The price
   per bit lambda that puts the training rows at --budget bits is folded into the output
   layer, logit_p = -(damage_p / lambda + bits_p), so the runtime's rule (argmax of logit -
   price * bits) picks argmin damage + lambda * bits at price 0, and a price moves lambda.
   --objective log_damage fits log(damage + 1e-6) instead (a few rows carry most of the damage,
   and in log space they no longer dominate the fit); the controller then carries head
   "log_damage", out_p = log(damage_p / lambda), and the runtime takes logit_p = -exp(out_p) - bits_p.
   --objective labels instead classifies the oracle's optimal allocation at the budget (each
   row takes the precision minimising damage + lambda * bits) by cross-entropy plus a penalty
   on (expected bits - budget)^2. Decisions may be per (token, layer) or per token (features
   averaged over layers, damage summed), as the runtime makes them.
At inference, --kv-bits B makes the runtime add a price per bit to the logits, adjusted
online so the cache lands at B effective bits (llama_kvq_params.price_step).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kvq_cli.controller import DAMAGE_FLOOR_PERCENTILE, EFF_BITS_OF, KNOWN_FEATURES, ControllerSpec, project_damage
from kvq_cli.errors import BadOption
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.kv import KvPolicy, KvqOptions

log = logging.getLogger(__name__)

ORACLE = KvPolicy("oracle", kvq="assign")
PRECISIONS = (2, 4, 8, 16)                   # the controller's classes
EFF_BITS = np.array([EFF_BITS_OF[p] for p in PRECISIONS])   # bits/element of each, block scales included
SIDE_BITS = {3: (4, 2)}                      # pools whose K and V sides differ: bits -> (K bits, V bits)
POOL_SETS = {"2,4,8,16": PRECISIONS, "2,3,4,8,16": (2, 3, 4, 8, 16), "0,2,4,8,16": (0, 2, 4, 8, 16)}   # `kvq train --pools`
MIN_FUTURE = 32                              # rows seen by fewer later queries carry no label
# position_frac is position / the context size the runtime was created with: a controller
# trained on 1k-token chunks would read it differently in an 8k chat (it helps ~8% on held-out
# damage at the training length only), so it is left out by default
NOT_TRANSFERABLE = ("position_frac",)
# the prompt regime: prompts like multiple-choice contexts, scored by the next PROMPT_CONT tokens
PROMPT_MIN, PROMPT_MAX, PROMPT_CONT = 16, 128, 16


def costs_of(precisions: tuple[int, ...]) -> np.ndarray:
    """Effective bits/element of each pool of `precisions`."""
    return np.array([EFF_BITS_OF[p] for p in precisions])


@dataclass
class Collected:
    """Per decided row: features (runtime order), damage per precision, and where it came from."""

    features: np.ndarray      # [n, n_features]
    damage: np.ndarray        # [n, len(precisions)]: relative attention-output damage in each pool (f16 last, 0)
    layer: np.ndarray         # [n]
    pos: np.ndarray           # [n]
    chunk: np.ndarray         # [n]
    names: list[str]
    n_layer: int
    k_center: np.ndarray | None = None   # [n_layer, n_embd_kv]: the K centering the rows were stored with
    precisions: tuple[int, ...] = PRECISIONS   # the pools of the damage columns


def calibration_chunks(engine: Engine, text: str, chunk_len: int, n_chunks: int) -> list[list[int]]:
    """The first n_chunks chunks of chunk_len tokens of `text` (BOS first, like a prompt)."""
    toks = engine.tokenize(text)
    per = chunk_len - 1
    n = min(n_chunks, len(toks) // per)
    if n == 0:
        raise BadOption(f"the calibration text has {len(toks)} tokens, fewer than one chunk of {chunk_len}")
    bos = engine.llm.token_bos()
    return [[bos] + toks[i * per:(i + 1) * per] for i in range(n)]


def k_center_of(model: str | Path, chunks: list[list[int]], n_threads: int | None = None) -> np.ndarray:
    """K centering [n_layer, n_embd_kv]: the mean post-RoPE K of each layer over the chunks'
    positions >= 1 (position 0, the attention sink, is far from every other row and would pull the mean)."""
    n_ctx = max(len(c) for c in chunks)
    total, n = None, 0
    with Engine(model, kv=KvPolicy("f16", kvq="static"), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
                kvq=KvqOptions(window=0, k_center=False)) as e:
        for chunk in chunks:
            e.decode(chunk, 0)
            sums = []
            for il in range(e.dims.n_layer):
                k, _, kpos, _ = e.read_layer(il)
                sums.append(k[kpos >= 1].sum(0, dtype=np.float64))
            total = np.stack(sums) if total is None else total + np.stack(sums)
            n += int((kpos >= 1).sum())
    return (total / max(n, 1)).astype(np.float32)


def roundtrip_deltas(engine: Engine, x: np.ndarray, side: int = 0,
                     precisions: tuple[int, ...] = PRECISIONS, u: np.ndarray | None = None,
                     v_unbias: bool = False) -> list[np.ndarray]:
    """x stored by each pool of `precisions` but the last (f16) minus x: what the pools do to
    these rows, K rows (side 0) or V rows (side 1: with least-squares block scales, or with v_unbias as
    the runtime stores them, Engine.roundtrip(v=True)); a k4v2 pool round-trips K at 4 bits, V at 2.
    With u (window_directions), K rows are rounded query-aware, as the runtime stores them."""
    bits = [SIDE_BITS.get(p, (p, p))[side] for p in precisions[:-1]]
    done = {b: engine.roundtrip(b, x, u if side == 0 else None, v=side == 1 and v_unbias) - x for b in dict.fromkeys(bits)}
    return [done[b] for b in bits]


def _attention(qh: np.ndarray, kg: np.ndarray, causal: np.ndarray, scale: float) -> np.ndarray:
    """Causal softmax attention weights [n_q, n_keys] of one head's queries over its K rows."""
    s = np.where(causal, qh @ kg.T * scale, -np.inf)
    s -= s.max(1, keepdims=True)
    a = np.exp(s)
    a /= a.sum(1, keepdims=True)
    return a


def window_directions(q: np.ndarray, qpos: np.ndarray, k: np.ndarray, kpos: np.ndarray, window: int,
                      q_from: int = 0) -> np.ndarray:
    """Per K row and KV head, sum of p^2 q over the queries that attend to the row while it is still
    in the f16 window (after it, not among layer_damage's later queries): the direction the runtime's
    query-aware rounding protects when the row leaves (kvq_qacc_add, weights below 1e-12 skipped)."""
    n_q, n_head, hd = q.shape
    n_head_kv = k.shape[1] // hd
    group = n_head // n_head_kv
    scale = 1.0 / math.sqrt(hd)
    causal = qpos[:, None] >= kpos[None, :]
    later = (qpos[:, None] > kpos[None, :] + window) & (qpos[:, None] >= q_from)
    seen = (qpos[:, None] > kpos[None, :]) & ~later
    u = np.zeros(k.shape, np.float64)
    for g in range(n_head_kv):
        cols = slice(g * hd, (g + 1) * hd)
        for j in range(group):
            qh = q[:, g * group + j].astype(np.float64)
            a = _attention(qh, k[:, cols].astype(np.float64), causal, scale)
            w = np.where(seen, a * a, 0.0)
            w[w <= 1e-12] = 0.0
            u[:, cols] += w.T @ qh
    return u.astype(np.float32)


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
    dmg = np.zeros((k.shape[0], len(dks) + drop), np.float64)
    out_sq = 0.0
    for g in range(n_head_kv):
        cols = slice(g * hd, (g + 1) * hd)
        kg, vg = k[:, cols], v[:, cols]
        vv = (vg * vg).sum(1)
        for j in range(group):
            qh = q[:, g * group + j]
            a = _attention(qh, kg, causal, scale)
            o = a @ vg
            oo = (o * o).sum(1)
            out_sq += oo.mean()
            a2 = np.where(later, a * a, 0.0)
            vo = o @ vg.T
            for p, (dk, dv) in enumerate(zip(dks, dvs)):
                dkg, dvg = dk[:, cols], dv[:, cols]
                sd = qh @ dkg.T * scale
                term = ((dvg * dvg).sum(1)[None, :] + 2 * sd * ((dvg * vg).sum(1)[None, :] - o @ dvg.T)
                        + sd * sd * (vv[None, :] - 2 * vo + oo[:, None]))
                dmg[:, p] += (a2 * term).sum(0)
            if drop:
                dmg[:, -1] += _drop_damage(qh, kg, vg, causal, later, scale)
    dmg /= np.maximum(n_later, 1)[:, None]
    dmg /= out_sq / n_head
    return dmg, n_later


def engine_layer_damage(e: Engine, il: int, window: int, precisions: tuple[int, ...] = PRECISIONS,
                        qar: bool = False, v_weight: float = 1.0, v_unbias: bool = False,
                        **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """layer_damage of the rows held for layer il on an oracle engine (record_q), with the pools'
    own round trips, plain or (`qar`, with the engine's qar_mu > 0) K rounded query-aware from the
    window's queries as the runtime stores it: (damage [n_keys, len(precisions) - 1], later-query
    counts, key positions). With v_weight w, the V errors enter scaled by sqrt(w), so the V part of
    the damage weighs w times (scripts/kv_split_probe.py); with v_unbias, V rows are stored with unbiased
    block scales (roundtrip_deltas)."""
    q, qpos = e.queries(il)
    k, v, kpos, _ = e.read_layer(il)
    u = window_directions(q, qpos, k, kpos, window, kw.get("q_from", 0)) if qar else None
    drop = precisions[0] == 0   # eviction: layer_damage's extra last column, moved to the front
    stored = precisions[drop:]
    dvs = roundtrip_deltas(e, v, 1, stored, v_unbias=v_unbias)
    if v_weight != 1.0:
        dvs = [dv * math.sqrt(v_weight) for dv in dvs]
    d, n_later = layer_damage(q, qpos, k, v, kpos, roundtrip_deltas(e, k, 0, stored, u), dvs, window, drop=drop, **kw)
    if drop:
        d = np.concatenate([d[:, -1:], d[:, :-1]], 1)
    return d, n_later, kpos


def decided_damage(e: Engine, n: int, window: int, precisions: tuple[int, ...] = PRECISIONS,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """engine_layer_damage of every layer's decided rows (position < n - window) of the last decode of n
    tokens, stacked layer after layer: (damage [rows, len(precisions) - 1], positions, layers)."""
    return decided_rows(e, n, window, lambda il: engine_layer_damage(e, il, window, precisions)[::2])


def decided_rows(e: Engine, n: int, window: int, layer_fn: Callable[[int], tuple[np.ndarray, np.ndarray]],
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


# `kvq train --v-weight` default: the V part of the damage targets weighs V_WEIGHT times. The
# first-order damage undervalues V errors: allocating damage_K + alpha * damage_V, the oracle's KL at
# 3 bits on held-out calibration chunks falls from 0.0100 (alpha 1) to 0.0089/0.0088/0.0088 at alpha
# 10/30/100 (results/kv_split_probe*.json); the shipped controller is trained with it.
V_WEIGHT = 10.0

SENS_WINDOW = 128   # layer_sensitivity's window (q8_0): the rule/adaptive window at 2,048 tokens
# The layer weights are (KL / damage) ** LAYER_WEIGHT_POWER: on held-out calibration chunks the
# shipped controller decoded adaptive@3/3.5 at KL 0.0143/0.0130 with power 1, 0.0132/0.0110 with 0.5
# (0.0163/0.0120 without weights); the MLP's damage estimates are too rough for the full ~100x range
# (results/layer_weight_probe_p*.json). On wikitext-2 test the weights made it worse (README), so the
# shipped controller has none and `kvq train` measures them only with --layer-weights N.
LAYER_WEIGHT_POWER = 0.5


def layer_weights_of(kl: np.ndarray, damage: np.ndarray, power: float = LAYER_WEIGHT_POWER) -> np.ndarray:
    """(KL / damage) ** power per layer, scaled so that the weighted damage sums to the unweighted sum."""
    w = (np.asarray(kl, np.float64) / np.maximum(np.asarray(damage, np.float64), 1e-30)) ** power
    return w * float(np.sum(damage)) / max(float((w * damage).sum()), 1e-30)


@dataclass
class LayerSensitivity:
    """Per layer: KL vs the all-f16 decode with that layer's decided rows at `bits` (mean over chunks), and
    the first-order damage of those rows (layer_damage, summed over the layer's rows, mean over chunks)."""
    kl: np.ndarray
    damage: np.ndarray
    bits: int

    def weight(self, power: float = LAYER_WEIGHT_POWER) -> np.ndarray:
        return layer_weights_of(self.kl, self.damage, power)


def layer_sensitivity(model: str | Path, text: str, *, k_center: np.ndarray | None, n_chunks: int = 2,
                      chunk_len: int = 1024, offset: int = 0, bits: int = 2, window: int = SENS_WINDOW,
                      n_threads: int | None = None, on_layer: Callable[[int, int], None] | None = None) -> LayerSensitivity:
    """What one unit of layer_damage costs in KL, per layer (ControllerSpec.layer_weight).

    layer_damage is relative to its layer's mean output, so it takes a unit to cost the same in every
    layer; it does not (SmolLM2-135M: layers 0 and 1 75x and 57x the median layer). On n_chunks chunks of
    chunk_len tokens of `text` from token `offset` (BOS first), the all-f16 decode (oracle engine, q8_0
    window of `window` rows, 32-token ubatches) gives each decided row's damage at `bits`; then for each
    layer the decode with that layer's decided rows at `bits` and every other row at f16 gives its KL
    over the chunk's second half. n_chunks * (n_layer + 1) decodes."""
    from kvq_cli.evaluate import _log_softmax

    if bits not in PRECISIONS[:-1]:
        raise BadOption(f"layer sensitivity bits must be one of {PRECISIONS[:-1]}, got {bits}")
    opts = KvqOptions(window=window, window_bits=8, per_layer=True, record_q=True)
    with Engine(model, kv=ORACLE, n_ctx=chunk_len, n_batch=chunk_len, n_ubatch=32, n_threads=n_threads, kvq=opts) as e:
        if k_center is not None:
            e.set_k_center(np.asarray(k_center, np.float32))
        toks, per = e.tokenize(text), chunk_len - 1
        if n_chunks < 1 or len(toks) < offset + n_chunks * per:
            raise BadOption(f"the calibration text has {len(toks)} tokens, too few for {n_chunks} layer-sensitivity "
                            f"chunks of {chunk_len} from token {offset}")
        bos, n_layer = e.llm.token_bos(), e.dims.n_layer
        kl, dmg = np.zeros(n_layer), np.zeros(n_layer)

        def log_probs(c: list[int], assignment: np.ndarray) -> np.ndarray:
            e.set_assignment(assignment)
            e.clear_trace()
            return _log_softmax(e.decode(c, 0, logits_from=len(c) // 2 - 1).astype(np.float64))

        for ci in range(n_chunks):
            c = [bos] + toks[offset + ci * per:offset + (ci + 1) * per]
            ref = log_probs(c, np.zeros(0, np.int32))
            d, pos, lay = decided_damage(e, len(c), window)   # from the reference decode, before the next one
            for il in range(n_layer):
                dmg[il] += d[lay == il, PRECISIONS.index(bits)].sum()
                a = np.full((len(c), n_layer), 16, np.int32)
                a[pos[lay == il], il] = bits
                lp = log_probs(c, a.reshape(-1))
                kl[il] += float((np.exp(ref) * (ref - lp)).sum(1).mean())
                if on_layer:
                    on_layer(ci * n_layer + il + 1, n_chunks * n_layer)
    return LayerSensitivity(kl=kl / n_chunks, damage=dmg / n_chunks, bits=bits)


def collect(model: str | Path, chunks: list[list[int]], *, window: int = 32, n_ubatch: int = 32,
            n_threads: int | None = None, on_chunk: Callable[[int, int], None] | None = None,
            k_center: np.ndarray | None = None, precisions: tuple[int, ...] = PRECISIONS,
            qar: bool = False, v_weight: float = 1.0, v_unbias: bool = False) -> Collected:
    """Run the oracle over each chunk and measure features and damage of every decided (token, layer) row
    (K stored centered by k_center when given, as the runtime will store it; K damage with
    query-aware rounding with `qar`, else plain; the V part weighted by v_weight, V rows with unbiased
    scales with v_unbias, engine_layer_damage)."""
    rows = _Rows(precisions, qar, v_weight, v_unbias)
    n_ctx = max(len(c) for c in chunks)
    opts = KvqOptions(window=window, trace=True, per_layer=True, record_q=True)
    with Engine(model, kv=ORACLE, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads, kvq=opts) as e:
        e.set_k_center(k_center)
        for ci, chunk in enumerate(chunks):
            e.clear_trace()
            e.decode(chunk, 0)
            rows.add_chunk(e, ci, window=window, min_future=MIN_FUTURE)
            if on_chunk:
                on_chunk(ci + 1, len(chunks))
        return rows.collected(e.dims.n_layer, k_center)


class _Rows:
    """Decided (token, layer) rows of the oracle chunks seen so far: features from the trace, damage per precision."""

    def __init__(self, precisions: tuple[int, ...] = PRECISIONS, qar: bool = False, v_weight: float = 1.0,
                 v_unbias: bool = False):
        self.parts: list[tuple] = []
        self.names: list[str] = []
        self.precisions = precisions
        self.qar = qar
        self.v_weight = v_weight
        self.v_unbias = v_unbias

    def add_chunk(self, e: Engine, ci: int, *, window: int, min_future: int, q_stride: int = 2, q_from: int = 0,
                  pos_below: int | None = None) -> None:
        """The rows of chunk `ci` just decoded on `e` (decided before position pos_below, seen by >= min_future
        counted queries), with damage from layer_damage(window, q_stride, q_from)."""
        tr = e.trace()
        self.names = tr.names
        for il in range(e.dims.n_layer):
            d, n_later, kpos = engine_layer_damage(e, il, window, self.precisions, self.qar, self.v_weight,
                                                   self.v_unbias, q_stride=q_stride, q_from=q_from)
            sel = tr.layer == il
            if pos_below is not None:
                sel &= tr.pos < pos_below
            rows = np.flatnonzero(sel)
            at = {int(p): i for i, p in enumerate(kpos)}
            idx = np.array([at[int(p)] for p in tr.pos[rows]], dtype=np.int64)
            keep = n_later[idx] >= min_future
            rows, idx = rows[keep], idx[keep]
            self.parts.append((tr.features[rows], np.concatenate([d[idx], np.zeros((len(idx), 1))], 1),
                               np.full(len(rows), il, np.int32), tr.pos[rows], np.full(len(rows), ci, np.int32)))

    def collected(self, n_layer: int, k_center: np.ndarray | None = None) -> Collected:
        f, d, layer, pos, chunk = (np.concatenate(x) for x in zip(*self.parts))
        return Collected(f, d, layer, pos, chunk, self.names, n_layer, k_center, self.precisions)


def prompt_chunks(engine: Engine, text: str, n_chunks: int, *, min_ctx: int = PROMPT_MIN, max_ctx: int = PROMPT_MAX,
                  cont_len: int = PROMPT_CONT, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt, continuation) pairs cut one after another from `text`: prompts of min_ctx..max_ctx tokens."""
    toks = engine.tokenize(text)
    rng = np.random.default_rng(seed)
    out: list[tuple[list[int], list[int]]] = []
    at = 0
    while len(out) < n_chunks:
        n = int(rng.integers(min_ctx, max_ctx + 1))
        if at + n + cont_len > len(toks):
            break
        out.append((toks[at:at + n], toks[at + n:at + n + cont_len]))
        at += n + cont_len
    if len(out) < 3:
        raise BadOption(f"the calibration text has {len(toks)} tokens, too few for 3 prompts of up to {max_ctx}")
    return out


def collect_prompts(model: str | Path, pairs: list[tuple[list[int], list[int]]], *, n_threads: int | None = None,
                    on_chunk: Callable[[int, int], None] | None = None, k_center: np.ndarray | None = None,
                    precisions: tuple[int, ...] = PRECISIONS, qar: bool = False, v_weight: float = 1.0,
                    v_unbias: bool = False) -> Collected:
    """The prompt regime (multiple choice, `kvq eval --kv-window 0`): each prompt is prefilled in one
    ubatch and every row is decided right after it (W = 0), from the attention of the prompt's own
    queries; damage is measured with the queries of the continuation only, which are the ones
    that see the stored rows (K query-aware from the prompt's own later queries with `qar`)."""
    rows = _Rows(precisions, qar, v_weight, v_unbias)
    n_ctx = max(len(a) + len(b) for a, b in pairs)
    opts = KvqOptions(window=0, trace=True, per_layer=True, record_q=True)
    with Engine(model, kv=ORACLE, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads, kvq=opts) as e:
        e.set_k_center(k_center)
        for ci, (ctx, cont) in enumerate(pairs):
            e.clear_trace()
            e.decode(ctx, 0)
            e.decode(cont, len(ctx))
            rows.add_chunk(e, ci, window=0, min_future=len(cont), q_stride=1, q_from=len(ctx), pos_below=len(ctx))
            if on_chunk:
                on_chunk(ci + 1, len(pairs))
        return rows.collected(e.dims.n_layer, k_center)


def per_token(c: Collected) -> Collected:
    """One row per token: features averaged over layers, damage summed (rows present in every layer)."""
    key = c.chunk.astype(np.int64) * 1_000_000 + c.pos
    uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    full = counts == c.n_layer
    f = np.zeros((len(uniq), c.features.shape[1]))
    d = np.zeros((len(uniq), c.damage.shape[1]))
    np.add.at(f, inv, c.features)
    np.add.at(d, inv, c.damage)
    f /= counts[:, None]
    return Collected(f[full].astype(np.float32), d[full], np.full(full.sum(), -1, np.int32),
                     (uniq % 1_000_000)[full].astype(np.int32), (uniq // 1_000_000)[full].astype(np.int32),
                     c.names, c.n_layer, c.k_center, c.precisions)


def price_for(damage: np.ndarray, budget: float, costs: np.ndarray = EFF_BITS) -> float:
    """lambda such that argmin(damage + lambda * costs) averages `budget` bits over the rows (bisection)."""
    lo, hi = 1e-12, 1e6
    for _ in range(100):
        lam = math.sqrt(lo * hi)
        if costs[np.argmin(damage + lam * costs, 1)].mean() > budget:
            lo = lam
        else:
            hi = lam
    return hi


def allocate(damage: np.ndarray, budget: float, costs: np.ndarray = EFF_BITS) -> np.ndarray:
    """Class per row minimising damage + lambda * bits, with lambda set so rows average `budget` bits."""
    if budget >= costs.max():
        return np.full(len(damage), int(np.argmax(costs)))
    if budget <= costs.min():
        return np.full(len(damage), int(np.argmin(costs)))
    return np.argmin(damage + price_for(damage, budget, costs) * costs, 1)


# -- the MLP ------------------------------------------------------------------------------

def _forward(params, z):
    w1, b1, w2, b2 = params
    pre = z @ w1.T + b1
    h = np.maximum(pre, 0)
    return pre, h, h @ w2.T + b2


def _loss_grad(params, z, y, budget, mu, costs=EFF_BITS):
    w1, b1, w2, b2 = params
    pre, h, logits = _forward(params, z)
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    n = len(z)
    ce = -np.log(p[np.arange(n), y] + 1e-12).mean()
    eb = (p * costs).sum(1)
    gap = eb.mean() - budget
    loss = ce + mu * gap * gap
    dlog = p.copy()
    dlog[np.arange(n), y] -= 1
    dlog /= n
    # d(gap^2)/dlogits = 2 gap * p * (bits - eb) / n
    dlog += mu * 2 * gap * p * (costs[None, :] - eb[:, None]) / n
    gw2 = dlog.T @ h
    gb2 = dlog.sum(0)
    dh = dlog @ w2
    dh[pre <= 0] = 0
    gw1 = dh.T @ z
    gb1 = dh.sum(0)
    return loss, ce, [gw1, gb1, gw2, gb2]


def _adam(params, grads, m, v, step: int, lr: float) -> None:
    """One Adam update of params in place (beta 0.9 / 0.999)."""
    for i, g in enumerate(grads):
        m[i] = 0.9 * m[i] + 0.1 * g
        v[i] = 0.999 * v[i] + 0.001 * g * g
        params[i] -= lr * (m[i] / (1 - 0.9 ** step)) / (np.sqrt(v[i] / (1 - 0.999 ** step)) + 1e-8)


@dataclass
class FitReport:
    """What training saw and reached."""

    n_train: int
    n_val: int
    epochs: int
    val_ce: float
    val_acc: float               # agreement with the oracle labels
    val_bits: float              # mean effective bits of the controller's choices (price 0)
    label_bits: float
    val_damage: float            # mean damage of the controller's choices
    oracle_damage: float         # ... of the oracle labels
    oracle_damage_same_bits: float   # ... of the oracle's allocation at the controller's bits
    static_damage: float         # ... of the best static mix at the same bits (interpolated)
    importance: dict[str, float] = field(default_factory=dict)   # held-out rise when a feature is shuffled
    importance_metric: str = "held-out cross-entropy rise when shuffled"
    train_bits: float | None = None   # mean effective bits of its choices at price 0 on the training rows


def fit(x: np.ndarray, y: np.ndarray, val: np.ndarray, *, budget: float, hidden: int = 16, seed: int = 0,
        epochs: int = 60, batch: int = 1024, lr: float = 3e-3, mu: float = 0.05, patience: int = 8,
        on_epoch: Callable[[int, int, float], None] | None = None, costs: np.ndarray = EFF_BITS):
    """Adam on cross-entropy + mu * (expected bits - budget)^2; returns (params, mean, std, epochs run)."""
    rng = np.random.default_rng(seed)
    tr = ~val
    mean = x[tr].mean(0)
    std = x[tr].std(0)
    std = np.where(std > 1e-8, std, 1.0)
    z = ((x - mean) / std).astype(np.float64)
    nf = x.shape[1]
    params = [rng.normal(0, math.sqrt(2 / nf), (hidden, nf)), np.zeros(hidden),
              rng.normal(0, math.sqrt(1 / hidden), (len(costs), hidden)), np.zeros(len(costs))]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    zt, yt, zv, yv = z[tr], y[tr], z[val], y[val]
    best, best_params, bad, step, ep = math.inf, [p.copy() for p in params], 0, 0, 0
    for ep in range(1, epochs + 1):
        order = rng.permutation(len(zt))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            _, _, grads = _loss_grad(params, zt[idx], yt[idx], budget, mu, costs)
            step += 1
            _adam(params, grads, m, v, step, lr)
        val_loss = _loss_grad(params, zv, yv, budget, mu, costs)[0]
        if on_epoch:
            on_epoch(ep, epochs, val_loss)
        if val_loss < best - 1e-5:
            best, best_params, bad = val_loss, [p.copy() for p in params], 0
        else:
            bad += 1
            if bad >= patience:
                break
    return best_params, mean, std, ep


def fit_damage(x: np.ndarray, t: np.ndarray, val: np.ndarray, *, hidden: int = 16, seed: int = 0, epochs: int = 60,
               batch: int = 1024, lr: float = 3e-3, patience: int = 8,
               on_epoch: Callable[[int, int, float], None] | None = None):
    """Adam on the mean squared error of the MLP's outputs against the damage `t` [n, k] of each row
    at each quantized precision; returns (params, mean, std, epochs run). The outputs estimate the
    expected damage given the features, which is what the decision rule needs."""
    rng = np.random.default_rng(seed)
    tr = ~val
    mean = x[tr].mean(0)
    std = x[tr].std(0)
    std = np.where(std > 1e-8, std, 1.0)
    z = ((x - mean) / std).astype(np.float64)
    nf, no = x.shape[1], t.shape[1]
    params = [rng.normal(0, math.sqrt(2 / nf), (hidden, nf)), np.zeros(hidden),
              rng.normal(0, math.sqrt(1 / hidden), (no, hidden)), t[tr].mean(0)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    zt, tt, zv, tv = z[tr], t[tr], z[val], t[val]

    def mse(P, zz, tt_):
        return float(((_forward(P, zz)[2] - tt_) ** 2).mean())

    best, best_params, bad, step, ep = math.inf, [p.copy() for p in params], 0, 0, 0
    for ep in range(1, epochs + 1):
        order = rng.permutation(len(zt))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            pre, h, out = _forward(params, zt[idx])
            g = 2 * (out - tt[idx]) / (len(idx) * no)
            dh = g @ params[2]
            dh[pre <= 0] = 0
            step += 1
            _adam(params, [dh.T @ zt[idx], dh.sum(0), g.T @ h, g.sum(0)], m, v, step, lr)
        val_loss = mse(params, zv, tv)
        if on_epoch:
            on_epoch(ep, epochs, val_loss)
        if val_loss < best * (1 - 1e-4):
            best, best_params, bad = val_loss, [p.copy() for p in params], 0
        else:
            bad += 1
            if bad >= patience:
                break
    return best_params, mean, std, ep


def fit_damage_ensemble(x: np.ndarray, t: np.ndarray, val: np.ndarray, *, members: int = 1, seed: int = 0,
                        **kw):
    """`members` damage regressors (fit_damage with seeds seed, seed + 1, ...) folded into one wider MLP
    whose output is their mean: the hidden layers side by side, the output weights divided by
    `members`. Exactly the ensemble average, so the runtime runs it as it runs any controller.
    Returns (params, mean, std, epochs of the longest member)."""
    fits = [fit_damage(x, t, val, seed=seed + i, **kw) for i in range(members)]
    mean, std = fits[0][1], fits[0][2]   # the same for every member: they depend on x and val only
    return average_mlps([f[0] for f in fits]), mean, std, max(f[3] for f in fits)


def average_mlps(ps: list) -> list:
    """One MLP [w1, b1, w2, b2] whose output is the mean of the given MLPs' outputs (same inputs, same
    normalisation): their hidden layers side by side, the output layers averaged."""
    return [np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps]),
            np.concatenate([p[2] for p in ps], 1) / len(ps), np.mean([p[3] for p in ps], 0)]


def damage_logits(params, lam: float, costs: np.ndarray = EFF_BITS):
    """The runtime's MLP head for a damage regressor: logit_p = -(damage_p / lam + bits_p), f16 damage 0.

    The C decision, argmax of logit - price * bits, is then argmin of damage + lam * (1 + price) * bits:
    price 0 is the training budget, and --kv-bits moves the price relative to lam."""
    w1, b1, w2, b2 = params
    w2c = np.concatenate([-w2 / lam, np.zeros((1, w2.shape[1]))])
    b2c = np.concatenate([-b2 / lam, [0.0]]) - costs
    return [w1, b1, w2c, b2c]


def _static_damage(damage: np.ndarray, bits: float, costs: np.ndarray = EFF_BITS) -> float:
    """Mean damage of the best two-level static mix (a fraction of rows at each of two adjacent pools) at `bits`."""
    means = damage.mean(0)
    i = int(np.clip(np.searchsorted(costs, bits) - 1, 0, len(costs) - 2))
    t = (bits - costs[i]) / (costs[i + 1] - costs[i])
    return float((1 - t) * means[i] + t * means[i + 1])


OBJECTIVES = ("damage", "log_damage", "labels")
LOG_FLOOR = 1e-6   # log_damage: added to each row's damage (relative to the mean 2-bit damage) before the log
LOG_ZERO = -80.0   # log_damage: the f16 output, a constant log damage (exp(-80) ~ 0)


def log_damage_head(params, lam: float):
    """The runtime's "log_damage" head for a regressor of log(damage + LOG_FLOOR): out_p = log(damage_p / lam),
    f16 a constant near zero damage. The C decision, argmax of -exp(out) - bits - price * bits, is then
    argmin of damage + lam * (1 + price) * bits, as with damage_logits."""
    w1, b1, w2, b2 = params
    w2c = np.concatenate([w2, np.zeros((1, w2.shape[1]))])
    b2c = np.concatenate([b2 - math.log(lam), [LOG_ZERO]])
    return [w1, b1, w2c, b2c]


def _logits(params, z, head: str, costs: np.ndarray = EFF_BITS) -> np.ndarray:
    out = _forward(params, z)[2]
    return -np.exp(out) - costs if head == "log_damage" else out


def damage_floor(damage: np.ndarray, percentile: float) -> list[float]:
    """ControllerSpec.damage_floor from training rows' damage [n, n_precisions] (ascending precisions): per
    adjacent pair the `percentile` of damage[:, o] / damage[:, o + 1] over rows with damage[:, o + 1] > 0
    (1, monotonicity only, where there are none: the damage of f16 is 0)."""
    out = []
    for o in range(damage.shape[1] - 1):
        m = damage[:, o + 1] > 0
        out.append(float(np.percentile(damage[m, o] / damage[m, o + 1], percentile)) if m.any() else 1.0)
    return out


def check_ensemble(ensemble: int, objective: str) -> None:
    """An ensemble averages regressors: N >= 1, and 1 for the labels objective (a classifier)."""
    if ensemble < 1 or (ensemble > 1 and objective == "labels"):
        raise BadOption(f"--ensemble must be >= 1, and 1 with --objective labels, got {ensemble}")


def train(c: Collected, *, budget: float, per_layer: bool, hidden: int = 16, seed: int = 0, epochs: int = 60,
          val_chunks: int = 2, features: list[str] | None = None, objective: str = "labels", ensemble: int = 1,
          floor_percentile: float = DAMAGE_FLOOR_PERCENTILE,
          on_epoch: Callable[[int, int, float], None] | None = None) -> tuple[ControllerSpec, FitReport]:
    """The MLP and a report. objective "labels": cross-entropy to the oracle's labels at `budget` bits
    per decided row; "damage": regression of each row's damage per precision, with the price per
    bit that puts the training rows at `budget` folded into the output layer; "log_damage": the same
    regression on log damage (a few rows carry most of the damage; in log space they no longer dominate
    the fit), for the runtime's "log_damage" head. With `ensemble` > 1 the regression objectives fit that
    many MLPs (seeds seed, seed + 1, ...) and ship their mean as one MLP of ensemble * hidden units.
    The regression objectives' controller carries the damage floor of the training rows at `floor_percentile`
    (0: none), which projects its estimates onto physical ones (ControllerSpec.damage_floor)."""
    if objective not in OBJECTIVES:
        raise BadOption(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective}")
    if not 0 <= floor_percentile < 50:
        raise BadOption(f"--damage-floor must be a percentile in [0, 50), got {floor_percentile:g}")
    check_ensemble(ensemble, objective)
    data = c if per_layer else per_token(c)
    names = features or [n for n in data.names if n in KNOWN_FEATURES and n not in NOT_TRANSFERABLE
                         and (per_layer or n != "layer_frac")]
    cols = [data.names.index(n) for n in names]
    x = data.features[:, cols].astype(np.float64)
    costs = costs_of(data.precisions)
    y = allocate(data.damage, budget, costs)
    chunks = np.unique(data.chunk)
    if len(chunks) <= val_chunks:
        raise BadOption(f"need more than {val_chunks} calibration chunks (got {len(chunks)}): raise --chunks")
    val = np.isin(data.chunk, chunks[-val_chunks:])
    floor = damage_floor(data.damage[~val], floor_percentile) if objective != "labels" and floor_percentile > 0 else None

    def decided(pred):   # estimates [n, n_precisions - 1] and f16's 0, projected with the floor: what decides
        d = np.concatenate([pred, np.zeros((len(pred), 1))], 1)
        return d if floor is None else project_damage(d, floor)

    if objective == "damage":
        scale = float(data.damage[~val, 0].mean()) or 1.0
        reg, mean, std, ep = fit_damage_ensemble(x, data.damage[:, :-1] / scale, val, members=ensemble, hidden=hidden,
                                                 seed=seed, epochs=epochs, on_epoch=on_epoch)
        lam = price_for(decided(_forward(reg, (x[~val] - mean) / std)[2]), budget, costs)
        params = damage_logits(reg, lam, costs)
    elif objective == "log_damage":
        scale = float(data.damage[~val, 0].mean()) or 1.0
        reg, mean, std, ep = fit_damage_ensemble(x, np.log(data.damage[:, :-1] / scale + LOG_FLOOR), val,
                                                 members=ensemble, hidden=hidden, seed=seed, epochs=epochs,
                                                 on_epoch=on_epoch)
        lam = price_for(decided(np.exp(_forward(reg, (x[~val] - mean) / std)[2])), budget, costs)
        params = log_damage_head(reg, lam)
    else:
        params, mean, std, ep = fit(x, y, val, budget=budget, hidden=hidden, seed=seed, epochs=epochs,
                                    on_epoch=on_epoch, costs=costs)
    w1, b1, w2, b2 = params
    spec = ControllerSpec(features=names, precisions=list(data.precisions), w1=w1.tolist(), b1=b1.tolist(),
                          w2=w2.tolist(), b2=b2.tolist(), feature_mean=mean.tolist(), feature_std=std.tolist(),
                          budget_bits=float(budget), granularity="token_layer" if per_layer else "token",
                          extra={"seed": seed, "objective": objective, **({"ensemble": ensemble} if ensemble > 1 else {})},
                          k_center=None if c.k_center is None else c.k_center.tolist(),
                          head="log_damage" if objective == "log_damage" else "logits",
                          damage_floor=floor).validate()
    zv = (x[val] - mean) / std

    def decision_logits(z):   # with the floor, the projected damage decides
        lg = _logits(params, z, spec.head, costs)
        return lg if spec.damage_floor is None else -project_damage(-(lg + costs), spec.damage_floor) - costs

    logits = decision_logits(zv)
    pred = logits.argmax(1)
    lp = logits - logits.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    ce = float(-lp[np.arange(len(pred)), y[val]].mean())
    importance = {}
    rng = np.random.default_rng(seed)
    dv = data.damage[val]
    rows = np.arange(len(pred))
    for j, n in enumerate(names):
        zs = zv.copy()
        zs[:, j] = zs[rng.permutation(len(zs)), j]
        lps = decision_logits(zs)
        if objective != "labels":   # relative rise of the decisions' damage (the logits are not probabilities)
            importance[n] = float(dv[rows, lps.argmax(1)].mean() / max(dv[rows, pred].mean(), 1e-30) - 1)
            continue
        lps = lps - lps.max(1, keepdims=True)
        lps = lps - np.log(np.exp(lps).sum(1, keepdims=True))
        importance[n] = float(-lps[rows, y[val]].mean() - ce)
    pred_bits = float(costs[pred].mean())
    report = FitReport(
        n_train=int((~val).sum()), n_val=int(val.sum()), epochs=ep, val_ce=ce,
        val_acc=float((pred == y[val]).mean()), val_bits=pred_bits, label_bits=float(costs[y[val]].mean()),
        val_damage=float(dv[np.arange(len(pred)), pred].mean()),
        oracle_damage=float(dv[np.arange(len(pred)), y[val]].mean()),
        oracle_damage_same_bits=float(dv[rows, allocate(dv, pred_bits, costs)].mean()),
        static_damage=_static_damage(dv, pred_bits, costs), importance=importance,
        importance_metric="held-out damage rise when shuffled, relative" if objective != "labels"
        else "held-out cross-entropy rise when shuffled",
        train_bits=float(costs[decision_logits((x[~val] - mean) / std).argmax(1)].mean()))
    return spec, report


REGIMES = ("both", "decode", "prompt")
PROMPT_HELD_OUT = 0.1   # share of the prompts held out for early stopping (decode: the last 2 chunks)


def merge_regimes(dec: Collected, pro: Collected, val_dec: int, val_pro: int) -> tuple[Collected, int]:
    """Both regimes as one training set, and its number of held-out chunks (the last ones).

    A prompt row's damage is an order of magnitude above a decode row's (its queries sit right after it), so the prompt
    rows' damage is rescaled to the decode rows' mean 2-bit damage: otherwise the regression would
    fit the prompt rows only. Chunk ids are renumbered with both regimes' held-out chunks last."""
    ud, up = np.unique(dec.chunk), np.unique(pro.chunk)
    tr_d, tr_p = ~np.isin(dec.chunk, ud[-val_dec:]), ~np.isin(pro.chunk, up[-val_pro:])
    scale = float(dec.damage[tr_d, 0].mean() / max(pro.damage[tr_p, 0].mean(), 1e-30))
    order = list(ud[:-val_dec]) + [("p", c) for c in up[:-val_pro]] + list(ud[-val_dec:]) + [("p", c) for c in up[-val_pro:]]
    ids = {k if isinstance(k, tuple) else ("d", k): i for i, k in enumerate(order)}
    chunk = np.concatenate([[ids[("d", c)] for c in dec.chunk], [ids[("p", c)] for c in pro.chunk]]).astype(np.int32)
    merged = Collected(np.concatenate([dec.features, pro.features]), np.concatenate([dec.damage, pro.damage * scale]),
                       np.concatenate([dec.layer, pro.layer]), np.concatenate([dec.pos, pro.pos]), chunk,
                       dec.names, dec.n_layer, dec.k_center, dec.precisions)
    return merged, val_dec + val_pro


def calibration_data(model: str | Path, text: str, *, regime: str, cache: Path | None, n_chunks: int, n_prompts: int,
                     chunk_len: int, window: int, n_threads: int | None = None,
                     on_chunk: Callable[[int, int], None] | None = None,
                     k_center: bool = True, precisions: tuple[int, ...] = PRECISIONS,
                     qar: bool = False, v_weight: float = 1.0, v_unbias: bool = False) -> tuple[Collected, int]:
    """The training rows of a regime (decode, prompt or both) and how many chunks are held out.

    With k_center, K is centered by its mean per layer over the decode chunks (k_center_of) in
    every pass, and the rows carry that centering (Collected.k_center, saved with the controller).
    With --regime both the cache is two files next to `cache`: NAME.decode.npz and NAME.prompt.npz."""
    if regime not in REGIMES:
        raise BadOption(f"--regime must be one of {', '.join(REGIMES)}, got {regime}")
    center = None
    if k_center:
        with Engine(model, kv=KvPolicy("f16", kvq="static"), n_ctx=chunk_len) as tok:
            center = k_center_of(model, calibration_chunks(tok, text, chunk_len, n_chunks), n_threads)
    parts = ("decode", "prompt") if regime == "both" else (regime,)
    held = {"decode": 2, "prompt": max(2, int(n_prompts * PROMPT_HELD_OUT))}
    got = {}
    for r in parts:
        where = cache.with_name(f"{cache.stem}.{r}.npz") if cache is not None and regime == "both" else cache
        got[r] = collect_cached(model, text, cache=where, n_chunks=n_chunks if r == "decode" else n_prompts,
                                chunk_len=chunk_len, window=window, regime=r, n_threads=n_threads, on_chunk=on_chunk,
                                k_center=center, precisions=precisions, qar=qar, v_weight=v_weight, v_unbias=v_unbias)
    if regime == "both":
        return merge_regimes(got["decode"], got["prompt"], held["decode"], held["prompt"])
    return got[regime], held[regime]


def collect_cached(model: str | Path, text: str, *, cache: Path | None, n_chunks: int, chunk_len: int,
                   window: int, regime: str = "decode", n_threads: int | None = None,
                   on_chunk: Callable[[int, int], None] | None = None, k_center: np.ndarray | None = None,
                   precisions: tuple[int, ...] = PRECISIONS, qar: bool = False, v_weight: float = 1.0,
                   v_unbias: bool = False) -> Collected:
    """collect() (regime decode) or collect_prompts() (regime prompt) over the calibration text,
    read from / written to an NPZ cache when given."""
    if regime not in ("decode", "prompt"):
        raise BadOption(f"cannot collect regime {regime}")
    meta = {"model": Path(model).name, "n_chunks": n_chunks, "chunk_len": chunk_len, "window": window}
    if regime == "prompt":
        meta = {"model": Path(model).name, "n_chunks": n_chunks, "regime": regime,
                "prompts": f"{PROMPT_MIN}-{PROMPT_MAX}+{PROMPT_CONT}"}
    # a digest of the centering: rows collected with another one (or none) are not reused
    meta["k_center"] = "none" if k_center is None else hashlib.sha256(np.ascontiguousarray(k_center, np.float32).tobytes()).hexdigest()[:16]
    if precisions != PRECISIONS:   # (caches of the default pools carry no key, as before it existed)
        meta["pools"] = ",".join(map(str, precisions))
    if qar:   # K damage with the runtime's query-aware rounding (plain caches carry no key)
        from kvq_cli.runtime._lib import kvq_lib

        meta["qar_mu"] = round(float(kvq_lib().llama_kvq_default_params().qar_mu), 6)
    if v_weight != 1.0:   # V errors weighted (caches of weight 1 carry no key)
        meta["v_weight"] = float(v_weight)
    if v_unbias:   # V damage with unbiased block scales (least-squares caches carry no key)
        meta["v_unbias"] = True
    if cache is not None and cache.is_file():
        try:
            z = np.load(cache, allow_pickle=False)
            saved = {k[5:]: z[k].item() for k in z.files if k.startswith("meta_")}
        except (OSError, ValueError, KeyError) as e:
            raise BadOption(f"--cache {cache}: not a kvq train cache ({e})") from None
        if saved != meta:
            raise BadOption(f"--cache {cache} was collected with {saved}, not {meta}", hint="use another --cache path")
        if on_chunk:
            on_chunk(n_chunks, n_chunks)
        return Collected(z["features"], z["damage"], z["layer"], z["pos"], z["chunk"],
                         [str(n) for n in z["names"]], int(z["n_layer"]), k_center, precisions)
    if regime == "prompt":
        with Engine(model, kv=KvPolicy("f16", kvq="static"), n_ctx=PROMPT_MAX + PROMPT_CONT) as tok:
            pairs = prompt_chunks(tok, text, n_chunks)
        c = collect_prompts(model, pairs, n_threads=n_threads, on_chunk=on_chunk, k_center=k_center, precisions=precisions,
                            qar=qar, v_weight=v_weight, v_unbias=v_unbias)
    else:
        with Engine(model, kv=KvPolicy("f16", kvq="static"), n_ctx=chunk_len) as tok:
            chunks = calibration_chunks(tok, text, chunk_len, n_chunks)
        c = collect(model, chunks, window=window, n_threads=n_threads, on_chunk=on_chunk, k_center=k_center,
                    precisions=precisions, qar=qar, v_weight=v_weight, v_unbias=v_unbias)
    if cache is not None:
        from kvq_cli.gguf_write import atomic_output

        with atomic_output(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=c.features, damage=c.damage, layer=c.layer, pos=c.pos, chunk=c.chunk,
                         names=np.array(c.names), n_layer=c.n_layer,
                         **{"meta_" + k: np.array(v) for k, v in meta.items()})
    return c


def oracle_pools(engine: Engine) -> tuple[tuple[int, ...], np.ndarray]:
    """The pools an oracle engine allocates over (its policy's, else the controller's) and their costs."""
    prec = engine.kv.precisions or PRECISIONS
    return prec, costs_of(prec)


def oracle_mc_assignment(engine: Engine, head: list[int], seqs: list[list[int]], budget: float) -> np.ndarray:
    """Multiple choice (W = 0): set the damage-optimal bits per (position, layer) of a context on an oracle engine.

    The scoring (evaluate.Scorer) prefills `head` (the context but its last token) in one ubatch
    and decodes each of `seqs` (the last context token and an ending) after it. Those are the
    only queries that see stored context rows, so each row's damage is summed over the endings,
    each measured with its own queries, after one pass with every row at f16. The rows of an
    ending are used at f16 inside its ubatch, so they get 2 bits, and the context rows share the
    rest of the budget: the cache as the last ending leaves it (what kv_stats measures) holds
    `budget` bits/element, as for every other policy. Installs the assignment for the next
    decode of the same tokens; returns bits [len(head) + longest seq, n_layer].
    """
    prec, costs = oracle_pools(engine)
    n0, n_layer = len(head), engine.dims.n_layer
    bits = np.full((n0 + max(len(s) for s in seqs), n_layer), prec[0], np.int32)
    engine.set_assignment(np.zeros(0, np.int32))   # nothing assigned: every row at f16
    if n0 > 0:
        engine.decode(head, 0)
        dmg = np.zeros((n0, n_layer, len(prec)))
        for seq in seqs:
            engine.clear_trace()
            engine.decode(seq, n0)
            for il in range(n_layer):
                d, _, kpos = engine_layer_damage(engine, il, 0, prec, q_stride=1, q_from=n0)
                ctx = kpos < n0
                dmg[kpos[ctx], il, :-1] += d[ctx]
        engine.clear_trace()
        last = len(seqs[-1])
        cls = allocate(dmg.reshape(-1, len(prec)), (budget * (n0 + last) - costs[0] * last) / n0, costs)
        bits[:n0] = np.asarray(prec)[cls].reshape(n0, n_layer)
    engine.set_assignment(bits.reshape(-1))
    return bits


def oracle_assignment(engine: Engine, tokens: list[int], budget: float) -> np.ndarray:
    """Set the damage-optimal bits per (position, layer) for `tokens` on an oracle engine.

    The engine (policy oracle, per_layer, record_q) decodes the tokens once with every row at
    f16, measures each row's damage with all its later queries, allocates so the whole cache
    (the final window included, at its f16 or q8_0 cost) holds `budget` bits/element, and installs the assignment
    for the next decode of the same tokens. Returns bits [n_tokens, n_layer].
    """
    prec, costs = oracle_pools(engine)
    window = engine.window
    n, n_layer = len(tokens), engine.dims.n_layer
    engine.set_assignment(np.zeros(0, np.int32))   # nothing assigned: every row at f16
    engine.clear_trace()
    engine.decode(tokens, 0)
    dmg = np.zeros((n, n_layer, len(prec)))
    for il in range(n_layer):
        d, _, kpos = engine_layer_damage(engine, il, window, prec)
        dmg[kpos, il, :-1] = d
    engine.clear_trace()
    bits = np.full((n, n_layer), 16, np.int32)
    w = min(window, n)
    decided = n - w
    if decided > 0:
        per_row = (budget * n - EFF_BITS_OF[engine.window_bits] * w) / decided   # window rows at f16 or q8_0
        cls = allocate(dmg[:decided].reshape(-1, len(prec)), per_row, costs)
        bits[:decided] = np.asarray(prec)[cls].reshape(decided, n_layer)
    engine.set_assignment(bits.reshape(-1))
    return bits
