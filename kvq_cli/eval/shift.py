"""Context-shift quality: how much a cache's predictions suffer when a text runs past its context.

Each chunk of text is three contexts long. It is fed in pieces (as a chat or a server slot gets
it) into a cache of `n_ctx` tokens that shifts when full as llama.cpp does (keep `n_keep`, drop
half of the rest, move the rest back), and into a cache that holds the whole chunk. Every token
after the first shift is scored by KL(reference || policy) against:

- `kl_vs_full`: stock f16 holding the whole chunk (no shift): what a shift costs, plus the policy's
  own error. The f16 cache's value is the cost of the shift alone.
- `kl_vs_f16_shifted`: stock f16 shifted the same way: the policy's error under shifting.
- `kl_unshifted`: the policy holding the whole chunk vs stock f16 holding it: its error without a shift.

All caches run piece by piece in lockstep on the same tokens, so the numbers are paired.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from kvq_cli.errors import BadOption
from kvq_cli.runtime.engine import Engine, ModelRef
from kvq_cli.runtime.kv import KvPolicy, parse_kv
from kvq_cli.train.oracle import log_softmax

F16 = "stock-f16"


@dataclass(frozen=True)
class ShiftRecord:
    """One policy's KL after context shifts (means over every scored token of every chunk)."""

    policy: str
    kl_vs_full: float
    kl_vs_f16_shifted: float
    kl_unshifted: float
    tokens_scored: int
    shifts: int
    bits_per_elem: float   # held by the shifting cache at the end of the last chunk


def feed_shifting(engine: Engine, piece: list[int], n_keep: int) -> tuple[np.ndarray, int]:
    """Decode `piece` after the cached tokens, shifting first if it does not fit; its log-probs and shifts made."""
    shifts = 0
    while engine.n_tokens + len(piece) > engine.n_ctx:
        engine.shift(n_keep, (engine.n_tokens - n_keep) // 2)
        shifts += 1
    return log_softmax(engine.decode(piece, engine.n_tokens, logits_from=0)), shifts


def _kl(ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    return (np.exp(ref) * (ref - lp)).sum(axis=-1)


def shift_kl(model: ModelRef, chunks: Sequence[list[int]], policies: Sequence[str], *, n_ctx: int,
             piece: int = 32, n_keep: int = 0, threads: int | None = None,
             on_chunk: Callable[[int], None] | None = None) -> list[ShiftRecord]:
    """KL after context shifts for each policy (F16 included as the shift-only baseline)."""
    if n_ctx < 4 * piece or any(len(c) <= n_ctx for c in chunks):
        raise BadOption("each chunk must be longer than --ctx, and --ctx at least 4 pieces")
    names = list(dict.fromkeys([F16, *policies]))
    kv: dict[str, KvPolicy] = {n: parse_kv(n) for n in names}
    n_full = max(len(c) for c in chunks)
    full_ref = Engine(model, kv=kv[F16], n_ctx=n_full, n_threads=threads, n_ubatch=piece)
    shifting = {n: Engine(model, kv=kv[n], n_ctx=n_ctx, n_threads=threads, n_ubatch=piece) for n in names}
    full = {n: Engine(model, kv=kv[n], n_ctx=n_full, n_threads=threads, n_ubatch=piece) for n in names if n != F16}
    sums = {n: np.zeros(3) for n in names}
    shifts = {n: 0 for n in names}
    scored = 0
    try:
        for ci, chunk in enumerate(chunks):
            for e in [full_ref, *shifting.values(), *full.values()]:
                e.truncate(0)
            for i in range(0, len(chunk), piece):
                toks = chunk[i:i + piece]
                ref = log_softmax(full_ref.decode(toks, full_ref.n_tokens, logits_from=0))
                got = {}
                for n, e in shifting.items():
                    got[n], s = feed_shifting(e, toks, n_keep)
                    shifts[n] += s
                unshifted = {n: log_softmax(e.decode(toks, e.n_tokens, logits_from=0)) for n, e in full.items()}
                keep = np.arange(i, i + len(toks)) >= n_ctx   # tokens after the first shift
                if not keep.any():
                    continue
                scored += int(keep.sum())
                for n in names:
                    sums[n][0] += _kl(ref[keep], got[n][keep]).sum()
                    sums[n][1] += _kl(got[F16][keep], got[n][keep]).sum()
                    if n != F16:
                        sums[n][2] += _kl(ref[keep], unshifted[n][keep]).sum()
            if on_chunk:
                on_chunk(ci)
        return [ShiftRecord(policy=n, kl_vs_full=float(sums[n][0] / scored), kl_vs_f16_shifted=float(sums[n][1] / scored),
                            kl_unshifted=float(sums[n][2] / scored), tokens_scored=scored, shifts=shifts[n],
                            bits_per_elem=float(shifting[n].kv_stats().bits_per_elem)) for n in names]
    finally:
        for e in [full_ref, *shifting.values(), *full.values()]:
            e.close()


@dataclass(frozen=True)
class LongChat:
    """A chat driven past its context: tokens decoded, shifts, replies, resident memory (MiB)."""

    tokens: int
    n_ctx: int
    shifts: int
    turns: int
    empty_replies: int
    rss_after_first_shift_mib: float
    rss_max_mib: float
    rss_last_mib: float


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def long_chat(engine: Engine, n_tokens: int, *, max_tokens: int = 64, seed: int = 0,
              on_turn: Callable[[int, int], None] | None = None) -> LongChat:
    """Chat on `engine` until n_tokens are decoded, with questions of its own; shifts when full."""
    from kvq_cli.config import GenerationConfig
    from kvq_cli.runtime.chat import ChatSession

    topics = ["the sea", "mountains", "bread", "rivers", "the moon", "bees", "trains", "winter", "music", "glass"]
    session = ChatSession(engine, GenerationConfig(max_tokens=max_tokens, temperature=0.7, seed=seed),
                          system="You are a helpful assistant. Answer in two sentences.")
    turns = empty = 0
    rss_first = rss_max = 0.0
    try:
        while session.n_fed < n_tokens:
            reply = "".join(session.reply(f"Tell me something new about {topics[turns % len(topics)]}."))
            turns += 1
            empty += not reply.strip()
            if session.n_shifts:
                now = rss_mib()
                rss_first = rss_first or now
                rss_max = max(rss_max, now)
            if on_turn:
                on_turn(turns, session.n_fed)
        return LongChat(tokens=session.n_fed, n_ctx=engine.n_ctx, shifts=session.n_shifts, turns=turns,
                        empty_replies=empty, rss_after_first_shift_mib=rss_first, rss_max_mib=rss_max,
                        rss_last_mib=rss_mib())
    finally:
        session.close()
