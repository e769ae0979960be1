"""The oracle: damage-optimal bits per (position, layer) at a budget, installed on an oracle engine."""
from __future__ import annotations

import math

import numpy as np

from kvq_cli.controller.spec import EFF_BITS_OF
from kvq_cli.runtime.inspector import Inspector
from kvq_cli.runtime.kv import KvPolicy
from kvq_cli.train.damage import EFF_BITS, PRECISIONS, costs_of, engine_layer_damage

ORACLE = KvPolicy("oracle", kvq="assign")


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


def oracle_pools(engine: Inspector) -> tuple[tuple[int, ...], np.ndarray]:
    """The pools an oracle engine allocates over (its policy's, else the controller's) and their costs."""
    prec = engine.kv.precisions or PRECISIONS
    return prec, costs_of(prec)


def oracle_mc_assignment(engine: Inspector, head: list[int], seqs: list[list[int]], budget: float) -> np.ndarray:
    """Multiple choice (W = 0): set the damage-optimal bits per (position, layer) of a context on an oracle engine.

    The scoring (eval.scoring.Scorer) prefills `head` (the context but its last token) in one ubatch
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


def oracle_assignment(engine: Inspector, tokens: list[int], budget: float) -> np.ndarray:
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


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities of logits x along the last axis."""
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
