"""Fit: a tiny MLP regresses each row's damage at 2/4/8 bits; the price per bit that puts the
training rows at the budget is folded into its output layer.

The MLP (features -> hidden ReLU -> one output per quantized precision) is fit by Adam on the
mean squared error against damage divided by the mean 2-bit damage (held-out chunks for early
stopping; deterministic for a seed). With lambda the price per bit that puts the training rows at
--budget bits, logit_p = -(damage_p / lambda + bits_p), so the runtime's rule (argmax of logit -
price * bits) picks argmin damage + lambda * bits at price 0, and a price moves lambda
(`--kv-bits B` makes the runtime adjust the price online so the cache lands at B bits).
Decisions may be per (token, layer) or per token (features averaged over layers, damage summed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kvq_cli.controller.spec import DAMAGE_FLOOR_PERCENTILE, KNOWN_FEATURES, ControllerSpec, project_damage
from kvq_cli.errors import BadOption
from kvq_cli.train.collect import Collected, per_token
from kvq_cli.train.damage import EFF_BITS, costs_of
from kvq_cli.train.oracle import allocate, price_for

# position_frac is position / the context size the runtime was created with: a controller
# trained on 1k-token chunks would read it differently in an 8k chat (it helps ~8% on held-out
# damage at the training length only), so it is left out by default
NOT_TRANSFERABLE = ("position_frac",)

# -- the MLP ------------------------------------------------------------------------------


def _forward(params, z):
    w1, b1, w2, b2 = params
    pre = z @ w1.T + b1
    h = np.maximum(pre, 0)
    return pre, h, h @ w2.T + b2


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
    importance_metric: str = "held-out damage rise when shuffled, relative"
    train_bits: float | None = None   # mean effective bits of its choices at price 0 on the training rows


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


def damage_floor(damage: np.ndarray, percentile: float) -> list[float]:
    """ControllerSpec.damage_floor from training rows' damage [n, n_precisions] (ascending precisions): per
    adjacent pair the `percentile` of damage[:, o] / damage[:, o + 1] over rows with damage[:, o + 1] > 0
    (1, monotonicity only, where there are none: the damage of f16 is 0)."""
    out = []
    for o in range(damage.shape[1] - 1):
        m = damage[:, o + 1] > 0
        out.append(float(np.percentile(damage[m, o] / damage[m, o + 1], percentile)) if m.any() else 1.0)
    return out


def train(c: Collected, *, budget: float, per_layer: bool, hidden: int = 16, seed: int = 0, epochs: int = 60,
          val_chunks: int = 2, features: list[str] | None = None,
          floor_percentile: float = DAMAGE_FLOOR_PERCENTILE,
          on_epoch: Callable[[int, int, float], None] | None = None) -> tuple[ControllerSpec, FitReport]:
    """The MLP and a report: regression of each row's damage per precision, with the price per bit that
    puts the training rows at `budget` folded into the output layer. The controller carries the damage
    floor of the training rows at `floor_percentile` (0: none), which projects its estimates onto
    physical ones (ControllerSpec.damage_floor)."""
    if not 0 <= floor_percentile < 50:
        raise BadOption(f"--damage-floor must be a percentile in [0, 50), got {floor_percentile:g}")
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
    floor = damage_floor(data.damage[~val], floor_percentile) if floor_percentile > 0 else None

    def decided(pred):   # estimates [n, n_precisions - 1] and f16's 0, projected with the floor: what decides
        d = np.concatenate([pred, np.zeros((len(pred), 1))], 1)
        return d if floor is None else project_damage(d, floor)

    scale = float(data.damage[~val, 0].mean()) or 1.0
    reg, mean, std, ep = fit_damage(x, data.damage[:, :-1] / scale, val, hidden=hidden, seed=seed, epochs=epochs,
                                    on_epoch=on_epoch)
    lam = price_for(decided(_forward(reg, (x[~val] - mean) / std)[2]), budget, costs)
    w1, b1, w2, b2 = damage_logits(reg, lam, costs)
    spec = ControllerSpec(features=names, precisions=list(data.precisions), w1=w1.tolist(), b1=b1.tolist(),
                          w2=w2.tolist(), b2=b2.tolist(), feature_mean=mean.tolist(), feature_std=std.tolist(),
                          budget_bits=float(budget), granularity="token_layer" if per_layer else "token",
                          extra={"seed": seed, "objective": "damage"},
                          k_center=None if c.k_center is None else c.k_center.tolist(),
                          damage_floor=floor).validate()
    zv = (x[val] - mean) / std

    def decision_logits(z):   # with the floor, the projected damage decides
        lg = _forward([w1, b1, w2, b2], z)[2]
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
    for j, n in enumerate(names):   # relative rise of the decisions' damage when feature j is shuffled
        zs = zv.copy()
        zs[:, j] = zs[rng.permutation(len(zs)), j]
        importance[n] = float(dv[rows, decision_logits(zs).argmax(1)].mean() / max(dv[rows, pred].mean(), 1e-30) - 1)
    pred_bits = float(costs[pred].mean())
    report = FitReport(
        n_train=int((~val).sum()), n_val=int(val.sum()), epochs=ep, val_ce=ce,
        val_acc=float((pred == y[val]).mean()), val_bits=pred_bits, label_bits=float(costs[y[val]].mean()),
        val_damage=float(dv[rows, pred].mean()),
        oracle_damage=float(dv[rows, y[val]].mean()),
        oracle_damage_same_bits=float(dv[rows, allocate(dv, pred_bits, costs)].mean()),
        static_damage=_static_damage(dv, pred_bits, costs), importance=importance,
        train_bits=float(costs[decision_logits((x[~val] - mean) / std).argmax(1)].mean()))
    return spec, report
