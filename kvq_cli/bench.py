"""Bench stage: prefill a real text to a context length, decode, and measure each KV policy.

Policies run interleaved within each repeat (policy A, B, C, then A, B, C again), so the
ratios between them are measured side by side on a noisy machine; each record reports the
median over repeats.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kvq_cli.errors import BadOption
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.kv import STOCK_POLICIES, KvPolicy, KvqOptions

log = logging.getLogger(__name__)


@dataclass
class BenchRecord:
    """One (policy, context) measurement; times are medians over `repeats`."""

    model: str
    kv: str
    ctx: int
    n_prefill: int
    n_gen: int
    repeats: int
    prefill_tok_s: float
    decode_tok_s: float
    decode_ms_per_tok: float
    kv_bytes: int
    bits_per_elem: float
    policy_ms_per_tok: float   # kvq features + decisions + re-quantization, per decoded token
    policy_share: float        # policy_ms_per_tok / decode_ms_per_tok
    threads: int | None


def default_text(min_chars: int = 400_000) -> str:
    """Real English text available offline: the docstrings of the Python standard library."""
    import importlib
    import pydoc
    import sys
    import warnings

    parts: list[str] = []
    total = 0
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name in ("antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"):
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:  # platform-specific modules
                continue
            doc = pydoc.getdoc(mod)
            for obj_name in sorted(getattr(mod, "__all__", []) or [])[:50]:
                obj = getattr(mod, obj_name, None)
                if obj is not None and not isinstance(obj, (int, float, str, bytes, tuple, list, dict)):
                    doc += "\n\n" + pydoc.getdoc(obj)
            if doc:
                parts.append(doc)
                total += len(doc)
            if total >= min_chars:
                break
    return "\n\n".join(parts)


def load_text(text_file: str | None, data_dir: str | None) -> tuple[str, str]:
    """(text, source name) from --text, --data (wikitext-2 test) or the built-in corpus."""
    if text_file:
        p = Path(text_file)
        if not p.is_file():
            raise BadOption(f"no such text file: {p}")
        return p.read_text(encoding="utf-8", errors="replace"), p.name
    if data_dir:
        from kvq_cli.evaluate import load_wikitext

        return load_wikitext(data_dir), "wikitext2-test"
    return default_text(), "python-stdlib-docstrings"


def _run_once(model: Path, policy: KvPolicy, ctx: int, prompt: list[int], n_gen: int,
              kvq: KvqOptions | None, n_threads: int | None) -> dict:
    with Engine(model, kv=policy, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=n_threads, kvq=kvq) as e:
        t0 = time.perf_counter()
        e.llm.eval(prompt)
        t1 = time.perf_counter()
        pol0 = e.kv_stats().policy_ms if e.kvq_enabled else 0.0
        tok = int(np.argmax(e.last_logits()))
        t2 = time.perf_counter()
        for _ in range(n_gen):
            e.llm.eval([tok])
            tok = int(np.argmax(e.last_logits()))
        t3 = time.perf_counter()
        st = e.kv_stats()
        pol = (st.policy_ms - pol0) if e.kvq_enabled else 0.0
        return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "kv_bytes": st.bytes_held,
                "bits": st.bits_per_elem, "policy_ms": pol}


def bench(model: str | Path, policies: list[KvPolicy], ctxs: list[int], *, n_gen: int = 32,
          repeats: int = 1, text: str, kvq: KvqOptions | None = None, n_threads: int | None = None,
          on_run: Callable[[str, int], None] | None = None) -> list[BenchRecord]:
    """Measure every policy at every context; records hold medians over repeats."""
    model = Path(model)
    if n_gen < 1 or repeats < 1:
        raise BadOption("--gen and --repeats must be >= 1")
    with Engine(model, kv=STOCK_POLICIES["stock-f16"], n_ctx=64) as tok_engine:  # tokenizer only
        all_tokens = tok_engine.tokenize(text)
    records = []
    for ctx in ctxs:
        n_prefill = ctx - n_gen
        if n_prefill < 1:
            raise BadOption(f"--ctx {ctx} leaves no room to prefill before {n_gen} generated tokens")
        if len(all_tokens) < n_prefill:
            raise BadOption(f"the text has {len(all_tokens)} tokens, fewer than the {n_prefill} to prefill")
        prompt = all_tokens[:n_prefill]
        runs: dict[str, list[dict]] = {p.name: [] for p in policies}
        for r in range(repeats):
            for p in policies:
                runs[p.name].append(_run_once(model, p, ctx, prompt, n_gen, kvq, n_threads))
                if on_run:
                    on_run(p.name, ctx)
        for p in policies:
            rs = runs[p.name]
            pre = statistics.median(x["prefill_s"] for x in rs)
            dec = statistics.median(x["decode_s"] for x in rs)
            pol = statistics.median(x["policy_ms"] for x in rs) / n_gen
            ms = 1000 * dec / n_gen
            records.append(BenchRecord(
                model=model.name, kv=p.name, ctx=ctx, n_prefill=n_prefill, n_gen=n_gen, repeats=repeats,
                prefill_tok_s=n_prefill / pre, decode_tok_s=n_gen / dec, decode_ms_per_tok=ms,
                kv_bytes=rs[-1]["kv_bytes"], bits_per_elem=rs[-1]["bits"], policy_ms_per_tok=pol,
                policy_share=pol / ms if ms else 0.0, threads=n_threads))
    return records


def records_to_json(records: list[BenchRecord]) -> list[dict]:
    return [asdict(r) for r in records]
