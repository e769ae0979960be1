"""Bench stage: prefill a real text to a context length, decode, and measure each KV policy.

Policies run interleaved within each repeat (policy A, B, C, then A, B, C again), so the
ratios between them are measured side by side on a noisy machine; each record reports the
median over repeats (and keeps every repeat's value). Ratios against a baseline (`vs`) are
taken at the same context within the same run. The roofline fields put each row beside the
memory-bandwidth bound: a decoded token must read every weight it multiplies and every KV
byte held, so bandwidth / those bytes is the fastest decode this machine could reach.
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
from kvq_cli.eval.machine import cpu_name, simd_level
from kvq_cli.runtime.engine import Engine, ModelRef, as_model_ref
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
    attn_ms_per_tok: float     # kvq attention op (thread 0's wall time), per decoded token; 0 for stock
    threads: int
    decode_tok_s_runs: list[float]
    prefill_tok_s_runs: list[float]
    reuse_prefill: bool = False      # one prefill per policy, repeats re-decode from it
    vs: str | None = None            # baseline: the fastest of the --vs policies at this context
    decode_vs: float | None = None   # decode_tok_s / the baseline's
    prefill_vs: float | None = None
    weight_bytes: int | None = None      # roofline: weight bytes read per decoded token
    bytes_per_token: int | None = None   # weight_bytes + KV bytes held
    bandwidth_gb_s: float | None = None  # measured read bandwidth of this machine
    bound_tok_s: float | None = None     # bandwidth / bytes_per_token
    bound_frac: float | None = None      # decode_tok_s / bound_tok_s
    cpu: str = ""                        # the machine that measured it (eval.machine.cpu_name)
    simd: str = ""                       # its SIMD level and the tiles kvq's attention ran (eval.machine.simd_level)

    @property
    def attn_vs_bound(self) -> float | None:
        """The kvq attention's ms/token over its own bandwidth bound, the KV bytes held read once at
        the measured bandwidth (--roofline; None for a stock cache or without a bandwidth)."""
        if not self.bandwidth_gb_s or not self.attn_ms_per_tok or not self.kv_bytes:
            return None
        return self.attn_ms_per_tok / (self.kv_bytes / (self.bandwidth_gb_s * 1e9) * 1e3)


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
        from kvq_cli.eval.scoring import load_wikitext

        return load_wikitext(data_dir), "wikitext2-test"
    return default_text(), "python-stdlib-docstrings"


def _decode(e: Engine, first: int, n_gen: int) -> float:
    """Greedy-decode n_gen tokens starting from token `first`; seconds taken."""
    tok = first
    t0 = time.perf_counter()
    for _ in range(n_gen):
        e.llm.eval([tok])
        tok = int(np.argmax(e.last_logits()))
    return time.perf_counter() - t0


def _run_once(model: ModelRef, policy: KvPolicy, ctx: int, prompt: list[int], n_gen: int,
              kvq: KvqOptions | None, n_threads: int) -> dict:
    with Engine(model, kv=policy, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=n_threads, kvq=kvq) as e:
        t0 = time.perf_counter()
        e.llm.eval(prompt)
        prefill_s = time.perf_counter() - t0
        st0 = e.kv_stats()
        decode_s = _decode(e, int(np.argmax(e.last_logits())), n_gen)
        st = e.kv_stats()
        return {"prefill_s": prefill_s, "decode_s": decode_s, "kv_bytes": st.bytes_held,
                "bits": st.bits_per_elem, "policy_ms": st.policy_ms - st0.policy_ms,
                "attn_ms": st.attn_ms - st0.attn_ms}


class _Prefilled:
    """--reuse-prefill: one engine per policy, prefilled once; each repeat rolls the cache back
    to the prefill and decodes the same tokens again."""

    def __init__(self, model: ModelRef, policy: KvPolicy, ctx: int, prompt: list[int], kvq: KvqOptions | None,
                 n_threads: int):
        self.engine = Engine(model, kv=policy, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=n_threads, kvq=kvq)
        try:
            t0 = time.perf_counter()
            self.engine.llm.eval(prompt)
            self.prefill_s = time.perf_counter() - t0
        except BaseException:
            self.engine.close()
            raise
        self.n_prefill = len(prompt)
        self.first = int(np.argmax(self.engine.last_logits()))
        self.runs = 0

    def run(self, n_gen: int) -> dict:
        e = self.engine
        if self.runs:
            e.truncate(self.n_prefill)
        self.runs += 1
        st0 = e.kv_stats()
        decode_s = _decode(e, self.first, n_gen)
        st = e.kv_stats()
        return {"prefill_s": self.prefill_s, "decode_s": decode_s, "kv_bytes": st.bytes_held,
                "bits": st.bits_per_elem, "policy_ms": st.policy_ms - st0.policy_ms,
                "attn_ms": st.attn_ms - st0.attn_ms}


def weight_bytes_per_token(model: str | Path) -> int:
    """Bytes of weights a decoded token reads: every tensor, except that only one row of the
    token embedding is gathered unless the output layer is tied to it."""
    from kvq_cli.gguf.read import read_gguf

    reader = read_gguf(model)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    emb = sizes.get("token_embd.weight", 0)
    if "output.weight" in sizes and emb:
        n_rows = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
        return sum(sizes.values()) - emb + emb // max(n_rows, 1)
    return sum(sizes.values())


def measure_bandwidth(n_threads: int, mib: int = 512, trials: int = 5) -> float:
    """Read bandwidth in GB/s: n_threads threads summing disjoint slices of a buffer far
    larger than the caches (NumPy releases the GIL); the best of `trials`."""
    from concurrent.futures import ThreadPoolExecutor

    buf = np.ones(mib * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(buf, n_threads)
    best = 0.0
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in range(trials):
            t0 = time.perf_counter()
            total = sum(pool.map(np.sum, parts))
            dt = time.perf_counter() - t0
            assert total == len(buf)
            best = max(best, buf.nbytes / dt / 1e9)
    return best


def bench(model: str | Path | ModelRef, policies: list[KvPolicy], ctxs: list[int], *, n_gen: int = 32,
          repeats: int = 1, text: str, kvq: KvqOptions | None = None, n_threads: int | None = None,
          vs: list[str] | None = None, roofline: bool = False, reuse_prefill: bool = False,
          on_run: Callable[[str, int], None] | None = None) -> list[BenchRecord]:
    """Measure every policy at every context; records hold medians over repeats.

    vs: baseline policy names (among `policies`): each record gets its ratios against the
    fastest of them at the same context. roofline: measure the memory bandwidth first and
    fill the bound fields. reuse_prefill: prefill once per policy and context and decode
    `repeats` times from it (the prefill speed is then one run, `prefill_tok_s_runs` has one
    value); for caches whose prefill is slow (stock quantized KV at 8k).
    """
    import os

    model = as_model_ref(model)
    n_threads = n_threads or os.cpu_count() or 1
    if n_gen < 1 or repeats < 1:
        raise BadOption("--gen and --repeats must be >= 1")
    names = [p.name for p in policies]
    missing = [v for v in vs or [] if v not in names]
    if missing:
        raise BadOption(f"--vs {', '.join(missing)} is not among the --kv policies")
    bandwidth = measure_bandwidth(n_threads) if roofline else None
    cpu, simd = cpu_name(), simd_level()
    wbytes = weight_bytes_per_token(model.path) if roofline else None
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
        if reuse_prefill:
            held: list[_Prefilled] = []
            try:
                for p in policies:
                    held.append(_Prefilled(model, p, ctx, prompt, kvq, n_threads))
                for r in range(repeats):
                    for p, h in zip(policies, held):
                        runs[p.name].append(h.run(n_gen))
                        if on_run:
                            on_run(p.name, ctx)
            finally:
                for h in held:
                    h.engine.close()
        else:
            for r in range(repeats):
                for p in policies:
                    runs[p.name].append(_run_once(model, p, ctx, prompt, n_gen, kvq, n_threads))
                    if on_run:
                        on_run(p.name, ctx)
        recs = []
        for p in policies:
            rs = runs[p.name]
            dec_runs = [n_gen / x["decode_s"] for x in rs]
            pre_runs = [n_prefill / x["prefill_s"] for x in (rs[:1] if reuse_prefill else rs)]
            dec = statistics.median(dec_runs)
            pol = statistics.median(x["policy_ms"] for x in rs) / n_gen
            attn = statistics.median(x["attn_ms"] for x in rs) / n_gen
            ms = 1000 / dec
            r = BenchRecord(
                model=model.name, kv=p.name, ctx=ctx, n_prefill=n_prefill, n_gen=n_gen, repeats=repeats,
                prefill_tok_s=statistics.median(pre_runs), decode_tok_s=dec, decode_ms_per_tok=ms,
                kv_bytes=rs[-1]["kv_bytes"], bits_per_elem=rs[-1]["bits"], policy_ms_per_tok=pol,
                policy_share=pol / ms, attn_ms_per_tok=attn, threads=n_threads,
                decode_tok_s_runs=[round(x, 3) for x in dec_runs], prefill_tok_s_runs=[round(x, 2) for x in pre_runs],
                reuse_prefill=reuse_prefill, cpu=cpu, simd=simd)
            if bandwidth is not None:
                r.weight_bytes = wbytes
                r.bytes_per_token = wbytes + r.kv_bytes
                r.bandwidth_gb_s = bandwidth
                r.bound_tok_s = bandwidth * 1e9 / r.bytes_per_token
                r.bound_frac = dec / r.bound_tok_s
            recs.append(r)
        if vs:
            base_dec = max((r for r in recs if r.kv in vs), key=lambda r: r.decode_tok_s)
            base_pre = max((r for r in recs if r.kv in vs), key=lambda r: r.prefill_tok_s)
            for r in recs:
                r.vs = base_dec.kv if base_dec is base_pre else f"{base_dec.kv} (decode), {base_pre.kv} (prefill)"
                r.decode_vs = r.decode_tok_s / base_dec.decode_tok_s
                r.prefill_vs = r.prefill_tok_s / base_pre.prefill_tok_s
        records += recs
    return records


def records_to_json(records: list[BenchRecord]) -> list[dict]:
    """Plain dicts for --json output."""
    return [asdict(r) for r in records]


def plot(records: list[BenchRecord], path: str | Path, title: str) -> None:
    """Decode tokens/s against context, one line per policy (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadOption("--plot needs matplotlib", hint="pip install 'kvq-cli[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in dict.fromkeys(r.kv for r in records):
        rs = sorted((r for r in records if r.kv == name), key=lambda r: r.ctx)
        ax.plot([r.ctx for r in rs], [r.decode_tok_s for r in rs], marker="o",
                label=f"{name} ({rs[-1].bits_per_elem:.2f} bits)", linestyle="--" if name.startswith("stock") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from kvq_cli.gguf.write import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def parse_ctxs(value: str) -> list[int]:
    """`--ctx 512,2048`: context lengths >= 2."""
    try:
        ctxs = [int(c) for c in value.split(",") if c.strip()]
    except ValueError:
        raise BadOption(f"--ctx takes comma-separated integers, got '{value}'") from None
    if not ctxs or min(ctxs) < 2:
        raise BadOption("--ctx needs context lengths >= 2")
    return ctxs


def check_plot(path: str | None) -> None:
    """--plot needs matplotlib (kvq-cli[plot])."""
    import importlib.util

    if path and importlib.util.find_spec("matplotlib") is None:
        raise BadOption("--plot needs matplotlib", hint="pip install 'kvq-cli[plot]'")
