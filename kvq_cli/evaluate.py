"""Evaluation stage: perplexity and KL divergence of KV policies, side by side on the same text.

Perplexity follows llama.cpp's `llama-perplexity`: the text is cut into chunks of n_ctx
tokens, each chunk is evaluated from an empty cache, and the second half of each chunk is
scored (so every scored token has at least n_ctx/2 tokens of context). All policies run
chunk by chunk in one process, so the KL divergence against the reference policy's logits
is computed on exactly the same positions without storing logits.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kvq_cli.errors import BadOption
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.kv import KvPolicy, KvqOptions

log = logging.getLogger(__name__)

WIKITEXT_FILE = Path("wikitext2") / "wiki.test.nonempty-lf.raw"


@dataclass
class PplRecord:
    """One policy's result on the wikitext-2 test text."""

    task: str
    kv: str
    n_tokens: int
    n_scored: int
    n_ctx: int
    ppl: float
    nll: float
    kl: float | None            # mean KL(reference || policy) over scored positions
    kl_ref: str
    top1_agree: float | None    # argmax agreement with the reference
    bits_per_elem: float
    seconds: float
    extra: dict = field(default_factory=dict)


def load_wikitext(data_dir: str | Path) -> str:
    """The wikitext-2 test text from a --data directory."""
    path = Path(data_dir) / WIKITEXT_FILE
    if not path.is_file():
        raise BadOption(f"no {WIKITEXT_FILE} under {data_dir}", hint="pass --data pointing at the evaluation data dir")
    return path.read_text(encoding="utf-8")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(model: str | Path, policies: list[KvPolicy], text: str, *, n_tokens: int = 32768,
               n_ctx: int = 512, n_ubatch: int = 512, kvq: KvqOptions | None = None,
               n_threads: int | None = None, reference: int = 0,
               on_chunk: Callable[[int, int], None] | None = None) -> list[PplRecord]:
    """Perplexity and KL vs policies[reference] for each policy over the first n_tokens of text."""
    if n_ctx % 2 or n_ctx < 16:
        raise BadOption("--ctx must be an even number >= 16")
    engines = [Engine(model, kv=p, n_ctx=n_ctx, logits_all=True, n_batch=n_ctx, n_ubatch=n_ubatch,
                      n_threads=n_threads, kvq=kvq) for p in policies]
    try:
        tokens = engines[0].tokenize(text)[:n_tokens]
        n_chunks = len(tokens) // n_ctx
        if n_chunks == 0:
            raise BadOption(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
        half = n_ctx // 2
        nll = np.zeros(len(policies))
        kls = np.zeros(len(policies))
        agree = np.zeros(len(policies))
        secs = np.zeros(len(policies))
        bits = np.zeros(len(policies))
        n_scored = 0
        for c in range(n_chunks):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
            targets = np.array(chunk[half:], dtype=np.int64)
            logps = []
            for i, e in enumerate(engines):
                e.llm.reset()
                t0 = time.perf_counter()
                e.llm.eval(chunk)
                secs[i] += time.perf_counter() - t0
                bits[i] += e.kv_stats().bits_per_elem
                # logits at position j predict token j+1: score positions half-1 .. n_ctx-2
                lp = _log_softmax(np.asarray(e.llm.scores[half - 1:n_ctx - 1], dtype=np.float64))
                nll[i] += -lp[np.arange(len(targets)), targets].sum()
                logps.append(lp)
            ref = logps[reference]
            for i, lp in enumerate(logps):
                kls[i] += (np.exp(ref) * (ref - lp)).sum(-1).sum()
                agree[i] += (ref.argmax(-1) == lp.argmax(-1)).sum()
            n_scored += len(targets)
            if on_chunk:
                on_chunk(c + 1, n_chunks)
        out = []
        for i, p in enumerate(policies):
            out.append(PplRecord(
                task="wikitext2", kv=p.name, n_tokens=n_chunks * n_ctx, n_scored=n_scored, n_ctx=n_ctx,
                ppl=math.exp(nll[i] / n_scored), nll=nll[i] / n_scored,
                kl=None if i == reference else kls[i] / n_scored, kl_ref=policies[reference].name,
                top1_agree=None if i == reference else agree[i] / n_scored,
                bits_per_elem=bits[i] / n_chunks, seconds=secs[i]))
        return out
    finally:
        for e in engines:
            e.close()


def records_to_json(records) -> list[dict]:
    """Plain dicts for --json output."""
    return [asdict(r) for r in records]
