"""The precision controller: a tiny MLP over per-token features, its file format and GGUF keys.

Forward pass (the C runtime computes the same):
    z      = (x - feature_mean) / feature_std          x: [n_features]
    h      = relu(w1 @ z + b1)                          w1: [hidden, n_features]
    logits = w2 @ h + b2                                w2: [n_precisions, hidden]
    bits   = precisions[argmax(logits)]
With head "log_damage" (a format the runtime reads; `kvq train` makes "logits" heads since its
log-damage objective decoded no better, docs/history.md) the outputs are each precision's
predicted log(damage / lambda), and
    logits = -exp(w2 @ h + b2) - eff_bits               eff_bits: 2.25, 4.5, 8.5, 16 (block scales included)
so the choice minimises predicted damage + lambda * bits, as with the damage regressor's linear
head, while the fit in log space is not dominated by the few rows with the largest damage.
The controller file (`kvq train --out`, `kvq embed`, `kvq convert --controller`) is JSON with
the same fields, matrices as nested lists; the runtime reads the GGUF form (embedded, or a
controller file: controller.embed.write_controller_file).

K centering (optional field `k_center`, [n_layer][n_embd_kv]): the mean post-RoPE K of each layer
on the calibration text. The runtime subtracts it from every K row before storing the row (every
pool), which moves all of a query's scores by the same q.mu and so leaves attention unchanged,
while the quantized pools code K - mu, a smaller signal than K. The controller
is trained with it (its features and damage are those of centered rows), so the two travel together.

Damage floor (optional field `damage_floor`, [n_precisions - 1], precisions ascending): a storage
precision never does less damage than a higher one, and on the calibration rows the damage at one
precision is never far below a fixed multiple of the next one's (`kvq train --damage-floor P` stores the
P-th percentile of each ratio, 0.1 by default). A regressor's estimates can break both where it extrapolates (negative damage at 2 bits:
such a row would stay at 2 bits at every budget). With the field the estimates d (d = -(out + eff_bits)
for the logits head, exp(out) for log_damage) are projected before the decision,
    d[-1] = max(d[-1], 0);   d[o] = max(d[o], damage_floor[o] * d[o + 1])   for o from n - 2 down to 0
    logits = -d - eff_bits

Running normalisation (optional field `norm_prior` n0 > 0; 0 or absent: the fixed z above): features such
as k_absmax have each model's own scale, so a "generic" controller normalises by statistics of the model
it runs on, measured over the rows it decides in a context, in decision order (position, then layer), each
row added before it is normalised. Per feature, in float64, started as if n0 rows at the trained
statistics had been seen:
    n, m, M2 = n0, feature_mean, n0 * feature_std**2                   once per context
    n += 1;  d = x - m;  m += d / n;  M2 += d * (x - m)                every row (Welford)
    z = float32((x - m) / sqrt(M2 / n))                                 (feature_std if M2 / n is not finite and > 0)
The runtime keeps the statistics for the context's life (removing cache rows does not reset them: they
estimate the model, not the cache); `logits(x)` and `decide(x)` take the rows of x as a fresh context's
decisions, in order.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvq_cli.errors import ControllerError
from kvq_cli.gguf.keys import Controller as K, Llm

CONTROLLER_VERSION = 1
# Features the runtime computes per token, by name (order in a controller is its own).
KNOWN_FEATURES = (
    "token_freq",      # occurrences of this token id so far / tokens so far
    "quality",         # quantization-damage proxy: relative K/V error at the lowest precision
    "attn_var",        # variance across heads of the attention the token received
    "attn_entropy",    # entropy of the attention rows that attended to it
    "layer_frac",      # layer index / n_layer (for per-token-and-layer decisions)
    "position_frac",   # position / context size
    "k_absmax",        # max |K| of the token
    "v_absmax",        # max |V| of the token
    "attn_recv",       # log(1 + attention received from later queries, relative to a uniform share)
)
# the runtime's pools; 3 is K at 4 bits with V at 2 ("k4v2"), 0 leaves the row out (eviction)
PRECISION_BITS = (0, 2, 3, 4, 8, 16)
EFF_BITS_OF = {0: 0.0, 2: 2.25, 3: 3.375, 4: 4.5, 8: 8.5, 16: 16.0}   # effective bits/element of each pool, block scales included
HEADS = ("logits", "log_damage")   # how the MLP's outputs become logits (module docstring)
GRANULARITIES = ("token", "token_layer")   # one decision per token (features averaged over layers), or per layer too
# kvq train's V weight: the V part of the damage targets weighs V_WEIGHT times. The first-order damage
# undervalues V errors: allocating damage_K + alpha * damage_V, the oracle's KL at 3 bits on held-out
# calibration chunks falls from 0.0100 (alpha 1) to 0.0089/0.0088/0.0088 at alpha 10/30/100
# (results/kv_split_probe*.json); the shipped controller is trained with it.
V_WEIGHT = 10.0
# kvq train's damage floor: each ratio of a row's damage at one precision to its damage at the next one, at
# this percentile of the training rows (ControllerSpec.damage_floor)
DAMAGE_FLOOR_PERCENTILE = 0.1


@dataclass
class ControllerSpec:
    """Weights, normalisation and metadata of one controller."""

    features: list[str]
    precisions: list[int]
    w1: list[list[float]]
    b1: list[float]
    w2: list[list[float]]
    b2: list[float]
    feature_mean: list[float]
    feature_std: list[float]
    budget_bits: float = 0.0
    granularity: str = "token"
    version: int = CONTROLLER_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    k_center: list[list[float]] | None = None   # [n_layer][n_embd_kv] or None
    head: str = "logits"
    damage_floor: list[float] | None = None     # [n_precisions - 1] damage projection (module docstring), or None
    norm_prior: int = 0                         # n0 > 0: running feature normalisation (module docstring); 0: fixed

    @property
    def hidden(self) -> int:
        return len(self.b1)

    def validate(self) -> "ControllerSpec":
        """Check version, names, shapes and finiteness; raise ControllerError on the first problem."""
        if self.version != CONTROLLER_VERSION:
            raise ControllerError(f"unsupported controller version {self.version} "
                                  f"(this kvq reads version {CONTROLLER_VERSION})")
        nf, nh, npr = len(self.features), len(self.b1), len(self.b2)
        if nf == 0 or nh == 0:
            raise ControllerError("controller has no features or no hidden units")
        unknown = [f for f in self.features if f not in KNOWN_FEATURES]
        if unknown:
            raise ControllerError(f"controller uses unknown feature(s) {', '.join(map(str, unknown))}",
                                  hint=f"known: {', '.join(KNOWN_FEATURES)}")
        if len(set(self.features)) != nf:
            raise ControllerError("controller lists a feature twice")
        bad_prec = [p for p in self.precisions if p not in PRECISION_BITS]
        if bad_prec or len(self.precisions) != npr or npr < 2:
            raise ControllerError(f"controller precisions {self.precisions} must be {npr} >= 2 "
                                  f"values from {PRECISION_BITS}, one per output")
        shapes = {"w1": (self.w1, (nh, nf)), "w2": (self.w2, (npr, nh))}
        for name, (mat, (rows, cols)) in shapes.items():
            if len(mat) != rows or any(len(r) != cols for r in mat):
                raise ControllerError(f"controller {name} must be {rows}x{cols}")
        for name, vec in (("feature_mean", self.feature_mean), ("feature_std", self.feature_std)):
            if len(vec) != nf:
                raise ControllerError(f"controller {name} must have {nf} values")
        for name in ("w1", "b1", "w2", "b2", "feature_mean", "feature_std"):
            value = getattr(self, name)
            flat = [x for r in value for x in r] if name in ("w1", "w2") else value
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in flat):
                raise ControllerError(f"controller {name} has non-numeric or non-finite values")
        if any(s <= 0 for s in self.feature_std):
            raise ControllerError("controller feature_std must be > 0")
        if self.granularity not in GRANULARITIES:
            raise ControllerError(f"controller granularity {self.granularity!r} must be one of {', '.join(GRANULARITIES)}")
        if self.head not in HEADS:
            raise ControllerError(f"controller head {self.head!r} must be one of {', '.join(HEADS)}")
        if not math.isfinite(self.budget_bits):
            raise ControllerError("controller budget_bits is not finite")
        if self.k_center is not None:
            kc = self.k_center
            if not kc or not isinstance(kc, list) or any(not isinstance(r, list) or len(r) != len(kc[0]) or not r for r in kc):
                raise ControllerError("controller k_center must be a non-empty n_layer x n_embd_kv matrix")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for r in kc for x in r):
                raise ControllerError("controller k_center has non-finite values")
        if self.damage_floor is not None:
            df = self.damage_floor
            if len(df) != npr - 1:
                raise ControllerError(f"controller damage_floor has {len(df)} values, expected {npr - 1}")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in df):
                raise ControllerError("controller damage_floor must be finite and >= 0")
            if any(b <= a for a, b in zip(self.precisions, self.precisions[1:])):
                raise ControllerError("controller damage_floor needs the precisions in ascending order")
        if not isinstance(self.norm_prior, int) or isinstance(self.norm_prior, bool):
            raise ControllerError(f"controller norm_prior must be an integer, got {self.norm_prior!r}")
        if not 0 <= self.norm_prior < 2 ** 32:
            raise ControllerError(f"controller norm_prior must be >= 0 (a uint32), got {self.norm_prior}")
        return self

    def check_model(self, dims, name: str = "the model") -> "ControllerSpec":
        """Refuse a controller whose K centering was made for another model (dims: gguf.read.ModelDims)."""
        if self.k_center is not None:
            got = (len(self.k_center), len(self.k_center[0]))
            want = (dims.n_layer, dims.n_head_kv * dims.head_dim)
            if got != want:
                raise ControllerError(f"controller k_center is {got[0]}x{got[1]}, but {name} needs n_layer x n_embd_kv = "
                                      f"{want[0]}x{want[1]}", hint="train the controller on this model")
        return self

    # -- decisions (NumPy reference of the C forward pass) ------------------------
    def logits(self, x):
        """Output logits for a [n, n_features] feature matrix (rows in decision order when norm_prior > 0)."""
        import numpy as np

        mean, std = np.asarray(self.feature_mean, np.float32), np.asarray(self.feature_std, np.float32)
        if self.norm_prior > 0:
            z = running_normalize(x, mean, std, self.norm_prior)
        else:
            z = (np.asarray(x, np.float32) - mean) / std
        h = np.maximum(z @ np.asarray(self.w1, np.float32).T + np.asarray(self.b1, np.float32), 0)
        out = h @ np.asarray(self.w2, np.float32).T + np.asarray(self.b2, np.float32)
        eb = np.asarray([EFF_BITS_OF[p] for p in self.precisions], np.float32)
        if self.damage_floor is not None:
            d = np.exp(out) if self.head == "log_damage" else -(out + eb)
            return -project_damage(d, self.damage_floor) - eb
        if self.head == "log_damage":
            return -np.exp(out) - eb
        return out

    def decide(self, x):
        """Chosen precision in bits per row of `x`."""
        import numpy as np

        return np.asarray(self.precisions)[np.argmax(self.logits(x), axis=-1)]

    # -- file format --------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": "kvq-controller", "version": self.version, "features": self.features,
                "precisions": self.precisions, "budget_bits": self.budget_bits,
                "granularity": self.granularity, "head": self.head, "w1": self.w1,
                "b1": self.b1, "w2": self.w2, "b2": self.b2, "feature_mean": self.feature_mean,
                "feature_std": self.feature_std, **({"k_center": self.k_center} if self.k_center is not None else {}),
                **({"damage_floor": self.damage_floor} if self.damage_floor is not None else {}),
                **({"norm_prior": self.norm_prior} if self.norm_prior else {}),
                **({"extra": self.extra} if self.extra else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ControllerSpec":
        if not isinstance(d, dict) or d.get("format") != "kvq-controller":
            raise ControllerError("not a kvq controller file (missing \"format\": \"kvq-controller\")")
        try:
            spec = cls(features=list(d["features"]), precisions=[int(p) for p in d["precisions"]],
                       w1=[[float(x) for x in r] for r in d["w1"]], b1=[float(x) for x in d["b1"]],
                       w2=[[float(x) for x in r] for r in d["w2"]], b2=[float(x) for x in d["b2"]],
                       feature_mean=[float(x) for x in d["feature_mean"]],
                       feature_std=[float(x) for x in d["feature_std"]],
                       budget_bits=float(d.get("budget_bits", 0.0)), version=int(d["version"]),
                       granularity=str(d.get("granularity", "token")), head=str(d.get("head", "logits")),
                       extra=dict(d.get("extra", {})),
                       k_center=None if d.get("k_center") is None else [[float(x) for x in r] for r in d["k_center"]],
                       damage_floor=None if d.get("damage_floor") is None else [float(x) for x in d["damage_floor"]],
                       norm_prior=d.get("norm_prior", 0))
        except KeyError as e:
            raise ControllerError(f"controller file lacks field {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:   # e.g. "version": Infinity
            raise ControllerError(f"controller file has a malformed field ({e})") from None
        return spec.validate()

    # -- GGUF metadata ------------------------------------------------------------
    def gguf_items(self) -> list[tuple[str, Any, str]]:
        """(key, value, kind) triples to write; kind is 'u32', 'f32', 'str', 'f32[]', 'i32[]' or 'str[]'."""
        flat = lambda m: [float(x) for r in m for x in r]  # noqa: E731 (row-major)
        return [
            (K.VERSION, self.version, "u32"),
            (K.FEATURES, list(self.features), "str[]"),
            (K.PRECISIONS, [int(p) for p in self.precisions], "i32[]"),
            (K.HIDDEN, self.hidden, "u32"),
            (K.W1, flat(self.w1), "f32[]"),
            (K.B1, [float(x) for x in self.b1], "f32[]"),
            (K.W2, flat(self.w2), "f32[]"),
            (K.B2, [float(x) for x in self.b2], "f32[]"),
            (K.FEATURE_MEAN, [float(x) for x in self.feature_mean], "f32[]"),
            (K.FEATURE_STD, [float(x) for x in self.feature_std], "f32[]"),
            (K.BUDGET_BITS, float(self.budget_bits), "f32"),
            (K.GRANULARITY, self.granularity, "str"),
            (K.HEAD, self.head, "str"),
        ] + ([(K.K_CENTER, flat(self.k_center), "f32[]")] if self.k_center is not None else []) \
          + ([(K.DAMAGE_FLOOR, [float(x) for x in self.damage_floor], "f32[]")] if self.damage_floor is not None else []) \
          + ([(K.NORM_PRIOR, self.norm_prior, "u32")] if self.norm_prior else [])

    @classmethod
    def from_gguf_fields(cls, get) -> "ControllerSpec | None":
        """Read from GGUF metadata through `get(key) -> value | None`; None when absent."""
        version = get(K.VERSION)
        if version is None:
            return None
        try:
            nh = int(get(K.HIDDEN))
            features = list(get(K.FEATURES))
            precisions = [int(p) for p in get(K.PRECISIONS)]
            w1, w2 = list(get(K.W1)), list(get(K.W2))
            nf, npr = len(features), len(precisions)
            if len(w1) != nh * nf or len(w2) != npr * nh:
                raise ControllerError(f"GGUF controller weights have wrong sizes "
                                      f"(w1 {len(w1)} != {nh}x{nf} or w2 {len(w2)} != {npr}x{nh})")
            spec = cls(features=features, precisions=precisions,
                       w1=[w1[i * nf:(i + 1) * nf] for i in range(nh)], b1=list(get(K.B1)),
                       w2=[w2[i * nh:(i + 1) * nh] for i in range(npr)], b2=list(get(K.B2)),
                       feature_mean=list(get(K.FEATURE_MEAN)), feature_std=list(get(K.FEATURE_STD)),
                       budget_bits=float(get(K.BUDGET_BITS) or 0.0), version=int(version),
                       granularity=str(get(K.GRANULARITY) or "token"), head=str(get(K.HEAD) or "logits"))
            kc = get(K.K_CENTER)
            if kc is not None:
                n_layer = get(Llm.BLOCK_COUNT.format(arch=get(Llm.ARCHITECTURE)))
                kc = [float(x) for x in kc]
                if not n_layer or len(kc) % int(n_layer):
                    raise ControllerError(f"{K.K_CENTER} has {len(kc)} values, not one row per layer ({n_layer})")
                per = len(kc) // int(n_layer)
                spec.k_center = [kc[i * per:(i + 1) * per] for i in range(int(n_layer))]
            df = get(K.DAMAGE_FLOOR)
            if df is not None:
                spec.damage_floor = [float(x) for x in df]
            prior = get(K.NORM_PRIOR)
            if prior is not None:
                spec.norm_prior = prior   # validate refuses a value that is not an integer
        except (TypeError, ValueError, OverflowError) as e:   # values of the wrong type, NaN or inf counts
            raise ControllerError(f"GGUF controller metadata is incomplete or malformed ({e})") from None
        return spec.validate()


def project_damage(d, floor):
    """Damage estimates [n, n_precisions] (ascending precisions) projected as `damage_floor` says
    (module docstring), in d's dtype."""
    import numpy as np

    d = np.array(d)
    d[:, -1] = np.maximum(d[:, -1], 0)
    for o in range(d.shape[1] - 2, -1, -1):
        d[:, o] = np.maximum(d[:, o], d.dtype.type(floor[o]) * d[:, o + 1])
    return d


def running_normalize(x, mean, std, n0: int):
    """Rows of x [n, n_features] normalised in order by running statistics started from n0 rows at
    mean, std (module docstring; the runtime's kvq_feature_norm), as float32."""
    import numpy as np

    x = np.asarray(x, np.float32).astype(np.float64)
    rows = x.reshape(-1, x.shape[-1])
    std0 = np.asarray(std, np.float32).astype(np.float64)
    n, m = float(n0), np.asarray(mean, np.float32).astype(np.float64)
    m2 = n * std0 * std0   # the runtime's operations in the runtime's order: the same bits
    z = np.empty(rows.shape, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for i, row in enumerate(rows):
            n += 1.0
            d = row - m
            m = m + d / n
            m2 = m2 + d * (row - m)
            var = m2 / n
            ok = (var > 0) & np.isfinite(var)
            z[i] = (row - m) / np.where(ok, np.sqrt(np.where(ok, var, 1.0)), std0)
    return z.reshape(x.shape)


def load_controller(path: str | os.PathLike) -> ControllerSpec:
    """Read and validate a controller JSON file."""
    p = Path(path)
    if not p.is_file():
        raise ControllerError(f"no such controller file: {p}")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControllerError(f"cannot read controller {p}: {e}") from None
    return ControllerSpec.from_json(data)


def controller_from_reader(reader) -> ControllerSpec | None:
    """The controller embedded in an open GGUFReader, or None."""
    def get(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    return ControllerSpec.from_gguf_fields(get)
