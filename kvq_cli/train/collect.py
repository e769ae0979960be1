"""Calibration rows: the oracle decodes calibration text and every decided (token, layer) row gets
its runtime features (trace) and its damage at each precision (train.damage).

Two regimes: decode (chunks decoded in small ubatches behind the window, as in chat and long text)
and prompt (short prompts prefilled at once and decided with W = 0, as in multiple choice).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kvq_cli.errors import BadOption
from kvq_cli.runtime.inspector import Inspector
from kvq_cli.runtime.kv import KvPolicy, KvqOptions
from kvq_cli.train.damage import PRECISIONS, engine_layer_damage
from kvq_cli.train.oracle import ORACLE

MIN_FUTURE = 32                              # rows seen by fewer later queries carry no label

# the prompt regime: prompts like multiple-choice contexts, scored by the next PROMPT_CONT tokens
PROMPT_MIN, PROMPT_MAX, PROMPT_CONT = 16, 128, 16


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


def calibration_chunks(engine: Inspector, text: str, chunk_len: int, n_chunks: int) -> list[list[int]]:
    """The first n_chunks chunks of chunk_len tokens of `text` (BOS first, like a prompt)."""
    toks = engine.tokenize(text)
    per = chunk_len - 1
    n = min(n_chunks, len(toks) // per)
    if n == 0:
        raise BadOption(f"the calibration text has {len(toks)} tokens, fewer than one chunk of {chunk_len}")
    bos = engine.llm.token_bos()
    return [[bos] + toks[i * per:(i + 1) * per] for i in range(n)]


def k_center_of(model: str | Path, chunks: list[list[int]], n_threads: int | None = None,
                on_chunk: Callable[[int, int], None] | None = None) -> np.ndarray:
    """K centering [n_layer, n_embd_kv]: the mean post-RoPE K of each layer over the chunks'
    positions >= 1 (position 0, the attention sink, is far from every other row and would pull the mean)."""
    n_ctx = max(len(c) for c in chunks)
    total, n = None, 0
    with Inspector(model, kv=KvPolicy("f16", kvq="static"), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
                kvq=KvqOptions(window=0, k_center=False)) as e:
        for ci, chunk in enumerate(chunks):
            e.decode(chunk, 0)
            sums = []
            for il in range(e.dims.n_layer):
                k, _, kpos, _ = e.read_layer(il)
                sums.append(k[kpos >= 1].sum(0, dtype=np.float64))
            total = np.stack(sums) if total is None else total + np.stack(sums)
            n += int((kpos >= 1).sum())
            if on_chunk:
                on_chunk(ci + 1, len(chunks))
    return (total / max(n, 1)).astype(np.float32)


def collect(model: str | Path, chunks: list[list[int]], *, window: int = 32, n_ubatch: int = 32,
            n_threads: int | None = None, on_chunk: Callable[[int, int], None] | None = None,
            k_center: np.ndarray | None = None, precisions: tuple[int, ...] = PRECISIONS,
            v_weight: float = 1.0) -> Collected:
    """Run the oracle over each chunk and measure features and damage of every decided (token, layer) row
    (K stored centered by k_center when given, as the runtime will store it; K damage with
    the V part weighted by v_weight, engine_layer_damage)."""
    rows = _Rows(precisions, v_weight)
    n_ctx = max(len(c) for c in chunks)
    opts = KvqOptions(window=window, trace=True, per_layer=True, record_q=True)
    with Inspector(model, kv=ORACLE, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads, kvq=opts) as e:
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

    def __init__(self, precisions: tuple[int, ...] = PRECISIONS, v_weight: float = 1.0):
        self.parts: list[tuple] = []
        self.names: list[str] = []
        self.precisions = precisions
        self.v_weight = v_weight

    def add_chunk(self, e: Inspector, ci: int, *, window: int, min_future: int, q_stride: int = 2, q_from: int = 0,
                  pos_below: int | None = None) -> None:
        """The rows of chunk `ci` just decoded on `e` (decided before position pos_below, seen by >= min_future
        counted queries), with damage from layer_damage(window, q_stride, q_from)."""
        tr = e.trace()
        self.names = tr.names
        for il in range(e.dims.n_layer):
            d, n_later, kpos = engine_layer_damage(e, il, window, self.precisions, self.v_weight,
                                                   q_stride=q_stride, q_from=q_from)
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


def prompt_chunks(engine: Inspector, text: str, n_chunks: int, *, min_ctx: int = PROMPT_MIN, max_ctx: int = PROMPT_MAX,
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
                    precisions: tuple[int, ...] = PRECISIONS, v_weight: float = 1.0) -> Collected:
    """The prompt regime (multiple choice, `kvq eval --kv-window 0`): each prompt is prefilled in one
    ubatch and every row is decided right after it (W = 0), from the attention of the prompt's own
    queries; damage is measured with the queries of the continuation only, which are the ones
    that see the stored rows."""
    rows = _Rows(precisions, v_weight)
    n_ctx = max(len(a) + len(b) for a, b in pairs)
    opts = KvqOptions(window=0, trace=True, per_layer=True, record_q=True)
    with Inspector(model, kv=ORACLE, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads, kvq=opts) as e:
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
                     on_chunk: Callable[[str, int, int], None] | None = None,
                     k_center: bool = True, precisions: tuple[int, ...] = PRECISIONS,
                     v_weight: float = 1.0) -> tuple[Collected, int]:
    """The training rows of a regime (decode, prompt or both) and how many chunks are held out.
    on_chunk(stage, i, n) reports each pass: "k_center", then "decode" and/or "prompt".

    With k_center, K is centered by its mean per layer over the decode chunks (k_center_of) in
    every pass, and the rows carry that centering (Collected.k_center, saved with the controller).
    With --regime both the cache is two files next to `cache`: NAME.decode.npz and NAME.prompt.npz."""
    if regime not in REGIMES:
        raise BadOption(f"--regime must be one of {', '.join(REGIMES)}, got {regime}")
    center = None
    if k_center:
        with Inspector(model, kv=KvPolicy("f16", kvq="static"), n_ctx=chunk_len) as tok:
            chunks = calibration_chunks(tok, text, chunk_len, n_chunks)
        center = k_center_of(model, chunks, n_threads,
                             on_chunk=(lambda i, n: on_chunk("k_center", i, n)) if on_chunk else None)
    parts = ("decode", "prompt") if regime == "both" else (regime,)
    held = {"decode": 2, "prompt": max(2, int(n_prompts * PROMPT_HELD_OUT))}
    got = {}
    for r in parts:
        where = cache.with_name(f"{cache.stem}.{r}.npz") if cache is not None and regime == "both" else cache
        got[r] = collect_cached(model, text, cache=where, n_chunks=n_chunks if r == "decode" else n_prompts,
                                chunk_len=chunk_len, window=window, regime=r, n_threads=n_threads,
                                on_chunk=(lambda i, n, r=r: on_chunk(r, i, n)) if on_chunk else None,
                                k_center=center, precisions=precisions, v_weight=v_weight)
    if regime == "both":
        return merge_regimes(got["decode"], got["prompt"], held["decode"], held["prompt"])
    return got[regime], held[regime]


def collect_cached(model: str | Path, text: str, *, cache: Path | None, n_chunks: int, chunk_len: int,
                   window: int, regime: str = "decode", n_threads: int | None = None,
                   on_chunk: Callable[[int, int], None] | None = None, k_center: np.ndarray | None = None,
                   precisions: tuple[int, ...] = PRECISIONS, v_weight: float = 1.0) -> Collected:
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
    if v_weight != 1.0:   # V errors weighted (caches of weight 1 carry no key)
        meta["v_weight"] = float(v_weight)
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
        with Inspector(model, kv=KvPolicy("f16", kvq="static"), n_ctx=PROMPT_MAX + PROMPT_CONT) as tok:
            pairs = prompt_chunks(tok, text, n_chunks)
        c = collect_prompts(model, pairs, n_threads=n_threads, on_chunk=on_chunk, k_center=k_center, precisions=precisions,
                            v_weight=v_weight)
    else:
        with Inspector(model, kv=KvPolicy("f16", kvq="static"), n_ctx=chunk_len) as tok:
            chunks = calibration_chunks(tok, text, chunk_len, n_chunks)
        c = collect(model, chunks, window=window, n_threads=n_threads, on_chunk=on_chunk, k_center=k_center,
                    precisions=precisions, v_weight=v_weight)
    if cache is not None:
        from kvq_cli.gguf.write import atomic_output

        with atomic_output(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=c.features, damage=c.damage, layer=c.layer, pos=c.pos, chunk=c.chunk,
                         names=np.array(c.names), n_layer=c.n_layer,
                         **{"meta_" + k: np.array(v) for k, v in meta.items()})
    return c
