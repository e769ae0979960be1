"""Evaluation stage: accuracy, perplexity and KL of KV policies, side by side on the same items.

Multiple choice (hellaswag, arc-easy, arc-challenge, openbookqa) scores each choice by the
log-likelihood of " " + choice given the context, as lm-evaluation-harness does: the
context is decoded once per item and reused for its choices (the cache is cut back to the
context before each choice). acc takes the best sum of log-probabilities, acc_norm the best
sum divided by the choice's length in characters.

Perplexity follows llama.cpp's `llama-perplexity`: the text is cut into chunks of n_ctx
tokens, each chunk is evaluated from an empty cache, and the second half of each chunk is
scored (so every scored token has at least n_ctx/2 tokens of context). All policies run
chunk by chunk (item by item) in one process, so KL divergence against the reference
policy's logits and paired accuracy differences use exactly the same positions and items.
For multiple choice, KL is the mean over items of the mean KL(reference || policy) over every
position that scores a choice token (all choices); when the reference was scored by an
earlier run, its logits are computed again for the items a policy still needs.
Intervals are bootstrap 95% percentile intervals over items (chunks for wikitext-2).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kvq_cli.errors import BadOption, ContextOverflow, OutputError
from kvq_cli.eval.tasks import MC_TASKS, McItem, load_mc_task
from kvq_cli.runtime.engine import Engine, ModelRef, as_model_ref
from kvq_cli.runtime.inspector import Inspector
from kvq_cli.runtime.kv import KvPolicy, KvqOptions
from kvq_cli.train.oracle import log_softmax, oracle_assignment, oracle_mc_assignment

log = logging.getLogger(__name__)

WIKITEXT_FILE = Path("wikitext2") / "wiki.test.nonempty-lf.raw"


def load_wikitext(data_dir: str | Path) -> str:
    """The wikitext-2 test text from a --data directory."""
    path = Path(data_dir) / WIKITEXT_FILE
    if not path.is_file():
        raise BadOption(f"no {WIKITEXT_FILE} under {data_dir}", hint="pass --data pointing at the evaluation data dir")
    return path.read_text(encoding="utf-8")


def _ppl_chunk(engines: Sequence[Engine], chunk: list[int], reference: int) -> np.ndarray:
    """Per engine [nll sum, KL sum vs engines[reference], top-1 agreements, seconds, bits] on one chunk."""
    half = len(chunk) // 2
    targets = np.array(chunk[half:], dtype=np.int64)
    out = np.zeros((len(engines), 5))
    ref_lp = ref_p = None
    # the reference first, then one policy's log-probabilities at a time (bounded memory)
    for i in [reference] + [j for j in range(len(engines)) if j != reference]:
        e = engines[i]
        t0 = time.perf_counter()
        if e.kv.kvq == "assign":
            oracle_assignment(e, chunk[:-1], e.kvq_opts.budget_for(e.kv))
        # logits at position j predict token j+1: score positions half-1 .. n-2
        logits = e.decode(chunk[:-1], 0, logits_from=half - 1)
        out[i, 3] = time.perf_counter() - t0
        out[i, 4] = e.kv_stats().bits_per_elem
        lp = log_softmax(logits.astype(np.float64))
        del logits
        out[i, 0] = -lp[np.arange(len(targets)), targets].sum()
        if ref_lp is None:
            ref_lp, ref_p = lp, np.exp(lp)
        out[i, 1] = (ref_p * (ref_lp - lp)).sum()
        out[i, 2] = (ref_lp.argmax(-1) == lp.argmax(-1)).sum()
    return out


# -- multiple choice ----------------------------------------------------------------

def encode_pair(engine: Engine, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens the way lm-eval splits them (no BOS).

    Trailing spaces of the context move to the continuation; the continuation's tokens are
    the tail of tokenize(context + continuation), so merges across the boundary count.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = engine.tokenize(context + continuation)
    ctx = engine.tokenize(context)
    return ctx, whole[len(ctx):]


def _sum_and_greedy(lp: np.ndarray, cont: list[int]) -> tuple[float, bool]:
    targets = np.asarray(cont, dtype=np.int64)
    picked = lp[np.arange(len(cont)), targets]
    return float(picked.sum()), bool((lp.argmax(-1) == targets).all())


def mean_kl(ref_lps: Sequence[np.ndarray], lps: Sequence[np.ndarray]) -> float:
    """Mean KL(ref || policy) over every scored position of an item's choices."""
    total = sum(float((np.exp(r) * (r - x)).sum()) for r, x in zip(ref_lps, lps))
    return total / sum(len(r) for r in ref_lps)


def window_bits_key(opts: KvqOptions, policy: KvPolicy) -> int | None:
    """An eval record's kv_window_bits: 8 when the policy's window rows are q8_0, else None (f16
    rows, no window, or a stock cache), so records from before the option keep their keys."""
    if policy.is_stock or opts.window_for(policy) == 0:
        return None
    return 8 if opts.window_bits_for(policy) == 8 else None


def refuse_oracle_with_ending_ubatch(policies: Sequence[KvPolicy], ending_ubatch: int | None) -> None:
    """The oracle measures each item with every ending in one ubatch, and scores it the same way."""
    if ending_ubatch is not None and any(p.kvq == "assign" for p in policies):
        raise BadOption("oracle@B scores each ending in one ubatch: leave out --ending-ubatch")


class Scorer:
    """Log-likelihoods of continuations on one engine, reusing the prefilled context.

    The context but its last token is prefilled once; each continuation is decoded after it
    together with the last context token, whose logits predict the continuation's first token.
    So every scored token is predicted from the cache as the policy left it after the context:
    a policy that decides rows after each ubatch (rule, adaptive) would otherwise predict the
    first token from a context it had not yet quantized, and the others from one it had.
    ending_ubatch: decode that many tokens of the ending per ubatch (1: as in generation, where
    such a policy decides each row before the next token); None: the whole ending in one
    ubatch, whose own rows then stay f16 until it ends.
    """

    def __init__(self, engine: Engine, ending_ubatch: int | None = None):
        refuse_oracle_with_ending_ubatch([engine.kv], ending_ubatch)
        self.engine = engine
        self.ending_ubatch = ending_ubatch
        self._head: list[int] | None = None
        self.n_truncated = 0

    def prefill(self, ctx: list[int]) -> None:
        """Decode ctx[:-1] from an empty cache unless it is the prefix already held."""
        head = ctx[:-1]
        if head != self._head:
            self._head = None
            if head:
                self.engine.decode(head, 0)
            self._head = list(head)

    def forget(self) -> None:
        """The engine's cache was used for something else: prefill again on the next call."""
        self._head = None

    def fit(self, ctx: list[int], longest_cont: int) -> list[int]:
        """Left-truncate the context so context + continuation fit the engine's context."""
        room = self.engine.n_ctx - longest_cont
        if room < 1:
            raise ContextOverflow(f"a continuation of {longest_cont} tokens does not fit --ctx {self.engine.n_ctx}")
        if len(ctx) > room:
            self.n_truncated += 1
            return ctx[-room:]
        return ctx

    def logprobs(self, ctx: list[int], cont: list[int]) -> np.ndarray:
        """Log-probabilities [len(cont), vocab] predicting cont after ctx (ctx[:-1] prefilled once for consecutive calls)."""
        if not ctx or not cont:
            raise BadOption("cannot score an empty context or continuation")
        self.prefill(ctx)
        seq, n0, k = ctx[-1:] + cont[:-1], len(ctx) - 1, self.ending_ubatch or len(cont)
        logits = np.concatenate([self.engine.decode(seq[i:i + k], n0 + i, logits_from=0)
                                 for i in range(0, len(seq), k)])
        return log_softmax(logits.astype(np.float64))

    def score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """(log p(cont | ctx), greedy)."""
        return _sum_and_greedy(self.logprobs(ctx, cont), cont)

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """lm-eval's loglikelihood request: (sum log p, is greedy)."""
        ctx, cont = encode_pair(self.engine, context, continuation)
        return self.score(self.fit(ctx, len(cont)), cont)

    def score_item(self, item: McItem) -> np.ndarray:
        """Log-likelihood of " " + choice for every choice of `item`."""
        return self.score_item_lps(item)[0]

    def score_item_lps(self, item: McItem) -> tuple[np.ndarray, list[np.ndarray]]:
        """Log-likelihood of " " + choice for every choice, and each choice's log-probability rows."""
        pairs = [encode_pair(self.engine, item.context, " " + c) for c in item.choices]
        ctx = self.fit(pairs[0][0], max(len(cont) for _, cont in pairs))
        if self.engine.kv.kvq == "assign":   # oracle@B: measure this item's damage first, then score with it
            oracle_mc_assignment(self.engine, ctx[:-1], [ctx[-1:] + cont[:-1] for _, cont in pairs],
                                 self.engine.kvq_opts.budget_for(self.engine.kv))
            self.forget()
        lps = [self.logprobs(ctx, cont) for _, cont in pairs]
        return np.array([_sum_and_greedy(lp, cont)[0] for lp, (_, cont) in zip(lps, pairs)]), lps


def mc_correct(item: McItem, lls: np.ndarray) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item: argmax of the log-likelihoods, raw and per character."""
    lengths = np.array([float(len(c)) for c in item.choices])
    return int(np.argmax(lls)) == item.gold, int(np.argmax(lls / lengths)) == item.gold


# -- statistics -----------------------------------------------------------------------

N_BOOT = 2000


def bootstrap_ci(x: np.ndarray, *, seed: int = 0, n_boot: int = N_BOOT) -> list[float] | None:
    """95% percentile interval of the mean of x, resampling its entries."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 200):  # bounded memory for long x
        idx = rng.integers(0, len(x), size=(min(200, n_boot - s), len(x)))
        means[s:s + len(idx)] = x[idx].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def _stderr(x: np.ndarray) -> float | None:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


# -- side-by-side runs with resumable records ------------------------------------------

@dataclass
class EvalRecord:
    """One (task, policy) result; `state` keeps per-item (per-chunk) data for --resume and pairing."""

    task: str
    kv: str
    split: str
    model: str
    ctx: int
    kv_bits: float | None
    kv_window: int | None
    ending_ubatch: int | None = None   # multiple choice: ending tokens per ubatch (None: the whole ending)
    k_center: bool | None = None       # True: K stored centered (--kv-center); None: as is
    kv_window_bits: int | None = None  # 8: window rows in q8_0; None: f16 rows (or no window)
    n: int = 0                   # items scored (multiple choice) or tokens scored (wikitext2)
    complete: bool = False
    bits_per_elem: float | None = None   # held at the end of each item (chunk), averaged
    bits_max: float | None = None        # ... and the most held at the end of any item (chunk)
    over_budget: bool | None = None      # bits_max above the policy's budget + BUDGET_SLACK (None: no budget)
    ref: str | None = None       # policy the diff_* and kl fields compare against
    seconds: float = 0.0
    acc: float | None = None
    acc_stderr: float | None = None
    acc_ci95: list[float] | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    acc_norm_ci95: list[float] | None = None
    diff_acc: float | None = None           # acc - ref acc on the same items
    diff_acc_ci95: list[float] | None = None
    diff_acc_norm: float | None = None
    diff_acc_norm_ci95: list[float] | None = None
    n_truncated: int = 0
    ppl: float | None = None
    ppl_ci95: list[float] | None = None
    kl: float | None = None                 # mean KL(ref || policy) per scored token
    kl_ci95: list[float] | None = None
    top1_agree: float | None = None
    state: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.task, self.kv, self.split, self.model, self.ctx, self.kv_bits, self.kv_window, self.ending_ubatch,
                self.k_center, self.kv_window_bits)

    @classmethod
    def from_json(cls, d: dict) -> "EvalRecord":
        import copy

        names = {f.name for f in fields(cls)}
        return cls(**{k: copy.deepcopy(v) for k, v in d.items() if k in names})


@dataclass(frozen=True)
class EvalConfig:
    """What `kvq eval` runs: tasks x policies on one model and data dir."""

    model: Path | ModelRef | None     # None while the options are checked, before the model resolves
    policies: tuple[KvPolicy, ...]
    tasks: tuple[str, ...]
    data: Path | None
    split: str = "test"
    limit: int | dict[str, int] | None = None  # items per multiple-choice task (or per task name)
    n_ctx: int = 1024                 # context of the multiple-choice engines
    ppl_ctx: int = 512                # wikitext-2 chunk length
    ppl_tokens: int = 32768           # wikitext-2 token budget
    # wikitext-2 ubatch of kvq policies with an f16 window: decisions happen after each ubatch, so
    # a chunk decoded in one 512-token ubatch would be scored with every key still at f16.
    # Small ubatches score what decoding sees (each token attends W to W + ubatch - 1 f16 keys).
    ppl_window_ubatch: int = 32
    kvq: KvqOptions = field(default_factory=KvqOptions)
    ref: str | None = "f16"
    mc_kl: bool = True                # multiple choice: KL vs ref per item (re-scores ref where it was resumed)
    ending_ubatch: int | None = None  # multiple choice: ending tokens per ubatch (Scorer); None: the whole ending
    n_threads: int | None = None
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.data is None:
            raise BadOption("no evaluation data", hint="pass --data DIR (or set KVQ_DATA)")
        if not Path(self.data).is_dir():
            raise BadOption(f"--data {self.data} is not a directory")
        if self.ppl_tokens < self.ppl_ctx:
            raise BadOption(f"--tokens ({self.ppl_tokens}) must be at least one chunk (--ppl-ctx {self.ppl_ctx})")
        if self.ending_ubatch is not None and self.ending_ubatch < 1:
            raise BadOption(f"--ending-ubatch must be >= 1, got {self.ending_ubatch}")


    def kvq_for(self, multiple_choice: bool) -> KvqOptions:
        """The kvq options of the multiple-choice or the wikitext-2 engines. Multiple choice defaults to W = 0: its items are
        shorter than a window, which would keep most rows at the window's bits and hold a policy
        named POLICY@B far above B bits; every row is then decided right after the prefill (the
        prompt regime the controller is trained for). --kv-window sets W for every task."""
        if multiple_choice and self.kvq.window is None:
            return replace(self.kvq, window=0)
        return self.kvq


Progress = Callable[[str, int, int], None]


class EvalRun:
    """Runs a config side by side, resuming from earlier records; `records` is always current."""

    def __init__(self, cfg: EvalConfig, previous: list[dict] | None = None):
        if cfg.ref is not None and cfg.ref not in [p.name for p in cfg.policies]:
            raise BadOption(f"the reference policy '{cfg.ref}' is not among the policies")
        if any(t in MC_TASKS for t in cfg.tasks):   # before any engine is loaded
            refuse_oracle_with_ending_ubatch(cfg.policies, cfg.ending_ubatch)
        self.cfg = cfg
        old = {}
        for d in previous or []:
            try:
                r = EvalRecord.from_json(d)
            except TypeError as e:
                raise BadOption(f"--resume file has a malformed record ({e})") from None
            r.ref = cfg.ref  # the reference is a reporting choice, recomputed at finalize
            old[r.key] = r
        self.records: list[EvalRecord] = []
        wanted = set()
        centered = as_model_ref(cfg.model).has_k_center
        for task in cfg.tasks:
            for p in cfg.policies:
                ctx = cfg.ppl_ctx if task == "wikitext2" else cfg.n_ctx
                kvq = cfg.kvq_for(task in MC_TASKS)
                r = EvalRecord(task=task, kv=p.name, split=cfg.split, model=cfg.model.name, ctx=ctx,
                               kv_bits=kvq.budget_for(p),
                               kv_window=None if p.is_stock else kvq.window_for(p, ctx), ref=cfg.ref,
                               kv_window_bits=window_bits_key(kvq, p),
                               ending_ubatch=None if task == "wikitext2" else cfg.ending_ubatch,
                               k_center=True if centered and not p.is_stock and cfg.kvq.k_center_for(p) else None)
                self.records.append(old.get(r.key, r))
                wanted.add(r.key)
        # records of other tasks/policies in the resumed file are kept as they are
        self.others = [r for k, r in old.items() if k not in wanted]
        self.on_checkpoint: Callable[[list[EvalRecord]], None] | None = None

    def _engines(self, n_ctx: int, *, ppl: bool = False) -> list[Engine]:
        engines: list[Engine] = []
        kvq = self.cfg.kvq_for(not ppl)
        try:
            for p in self.cfg.policies:
                windowed = ppl and not p.is_stock and kvq.window_for(p) > 0
                ubatch = self.cfg.ppl_window_ubatch if windowed else 512
                opts = kvq
                if p.kvq == "assign":
                    if opts.budget_for(p) is None:
                        raise BadOption(f"--kv {p.name} needs a budget: oracle@BITS or --kv-bits")
                    opts = replace(opts, per_layer=True, record_q=True)
                cls = Inspector if p.kvq == "assign" else Engine   # the oracle installs assignments
                engines.append(cls(self.cfg.model, kv=p, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(ubatch, n_ctx),
                                      n_threads=self.cfg.n_threads, kvq=opts))
        except BaseException:
            for e in engines:
                e.close()
            raise
        return engines

    def all_records(self) -> list[EvalRecord]:
        """What --json holds: the resumed file's records of other tasks/policies, then this run's."""
        return self.others + self.records

    def _checkpoint(self) -> None:
        if self.on_checkpoint:
            self.on_checkpoint(self.all_records())

    def run(self, on_progress: Progress | None = None) -> list[EvalRecord]:
        """Score every task for every policy; records are finalized (metrics filled) at the end."""
        cfg = self.cfg
        mc = [t for t in cfg.tasks if t in MC_TASKS]
        limit = (lambda t: cfg.limit.get(t)) if isinstance(cfg.limit, dict) else (lambda t: cfg.limit)
        items = {t: load_mc_task(cfg.data, t, cfg.split, limit(t)) for t in mc}  # fail early on bad data
        text = None
        if "wikitext2" in cfg.tasks:
            from kvq_cli.eval.tasks import load_text

            text = load_text(cfg.data, "wikitext2", cfg.split)
        if cfg.ppl_ctx % 2 or cfg.ppl_ctx < 16:
            raise BadOption("--ppl-ctx must be an even number >= 16")
        try:
            if mc:
                engines = self._engines(cfg.n_ctx)
                try:
                    for t in mc:
                        self._run_mc(t, items[t], engines, on_progress)
                finally:
                    for e in engines:
                        e.close()
            if text is not None:
                engines = self._engines(cfg.ppl_ctx, ppl=True)
                try:
                    self._run_ppl(text, engines, on_progress)
                finally:
                    for e in engines:
                        e.close()
        finally:
            self.finalize()
        self._checkpoint()
        return self.records

    def _task_records(self, task: str) -> list[EvalRecord]:
        return [r for r in self.records if r.task == task]

    def _run_mc(self, task: str, items: list[McItem], engines: list[Engine], on_progress: Progress | None) -> None:
        recs = self._task_records(task)
        scorers = [Scorer(e, self.cfg.ending_ubatch) for e in engines]
        names = [p.name for p in self.cfg.policies]
        ref = names.index(self.cfg.ref) if self.cfg.ref is not None else None
        for j, r in enumerate(recs):
            st = r.state
            # a smaller --limit than a resumed record scored: keep only the items asked for
            for k in ("correct", "correct_norm"):
                st[k] = st.get(k, "")[:len(items)]
            st["bits"] = st.get("bits", [])[:len(items)]
            r.n = len(st["correct"])
            # per-item KL vs the reference: only while it covers every scored item against this reference
            kl = st.get("kl")
            if kl is not None:
                kl = kl[:len(items)]
            ok = self.cfg.mc_kl and ref is not None and j != ref and st.get("kl_ref") in (None, names[ref]) and r.n == len(kl or [])
            st["kl"] = kl if ok and kl is not None else ([] if ok else None)
            st["kl_ref"] = names[ref] if ok else None
        start = min(r.n for r in recs)
        for i in range(start, len(items)):
            need = [j for j, r in enumerate(recs) if r.n <= i]
            ref_lps = None
            if ref is not None and any(recs[j].state["kl"] is not None for j in need) and ref not in need:
                ref_lps = scorers[ref].score_item_lps(items[i])[1]   # the reference was scored earlier: its logits again
            # the reference first, so that the others' KL can be taken against it
            for j in sorted(need, key=lambda j: j != ref):
                r, s = recs[j], scorers[j]
                t0 = time.perf_counter()
                lls, lps = s.score_item_lps(items[i])
                r.seconds += time.perf_counter() - t0
                if j == ref:
                    ref_lps = lps
                elif r.state["kl"] is not None:
                    r.state["kl"].append(round(mean_kl(ref_lps, lps), 7))
                a, an = mc_correct(items[i], lls)
                r.state["correct"] += "01"[a]
                r.state["correct_norm"] += "01"[an]
                r.state["bits"].append(round(s.engine.kv_stats().bits_per_elem, 4))
                r.n_truncated += s.n_truncated
                s.n_truncated = 0
                r.n = len(r.state["correct"])
            if on_progress:
                on_progress(task, i + 1, len(items))
            if (i + 1) % self.cfg.checkpoint_every == 0:
                self.finalize()
                self._checkpoint()
        for r in recs:
            r.complete = r.n >= len(items)
        if on_progress:
            on_progress(task, len(items), len(items))

    def _run_ppl(self, text: str, engines: list[Engine], on_progress: Progress | None) -> None:
        cfg = self.cfg
        recs = self._task_records("wikitext2")
        tokens = engines[0].tokenize(text)[:cfg.ppl_tokens]
        n_chunks = len(tokens) // cfg.ppl_ctx
        if n_chunks == 0:
            raise BadOption(f"the text has {len(tokens)} tokens, fewer than one chunk of {cfg.ppl_ctx}")
        names = [p.name for p in cfg.policies]
        ref = names.index(cfg.ref) if cfg.ref is not None else 0
        for r in recs:
            if r.state.get("kl_ref") != names[ref]:  # KL sums against another reference are not reusable
                r.state["chunks"] = []
                r.state["kl_ref"] = names[ref]
        start = min(len(r.state["chunks"]) for r in recs)
        for c in range(start, n_chunks):
            need = [i for i, r in enumerate(recs) if len(r.state["chunks"]) <= c]
            run = sorted(set(need) | {ref})
            sums = _ppl_chunk([engines[i] for i in run], tokens[c * cfg.ppl_ctx:(c + 1) * cfg.ppl_ctx], run.index(ref))
            for j, i in enumerate(run):
                if i in need:
                    nll, kl, agree, secs, bits = sums[j]
                    recs[i].state["chunks"].append([nll, kl, agree, cfg.ppl_ctx // 2, bits])
                    recs[i].seconds += secs
                    recs[i].n = sum(ch[3] for ch in recs[i].state["chunks"])
            if on_progress:
                on_progress("wikitext2", c + 1, n_chunks)
            if (c + 1) % max(1, self.cfg.checkpoint_every // 10) == 0:
                self.finalize()
                self._checkpoint()
        for r in recs:
            r.complete = len(r.state["chunks"]) >= n_chunks

    def finalize(self) -> None:
        """Fill every record's metrics from its state (paired with its task's reference record)."""
        seed = self.cfg.seed
        for r in self.records:
            ref = next((x for x in self.records if x.task == r.task and x.kv == r.ref), None)
            if r.task == "wikitext2":
                _finalize_ppl(r, ref if ref is not r else None, seed)
            else:
                _finalize_mc(r, ref if ref is not r else None, seed)


def _bits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(np.float64) - ord("0")


# what a run named POLICY@B may hold above B at the end of an item or chunk before its record says it was over
BUDGET_SLACK = 0.1


def _held(r: EvalRecord, bits: np.ndarray) -> None:
    r.bits_per_elem, r.bits_max = float(bits.mean()), float(bits.max())
    r.over_budget = None if r.kv_bits is None else r.bits_max > r.kv_bits + BUDGET_SLACK


def _finalize_mc(r: EvalRecord, ref: EvalRecord | None, seed: int) -> None:
    n = len(r.state.get("correct", ""))
    if n == 0:
        return
    r.n = n
    _held(r, np.asarray(r.state["bits"], np.float64))
    for name in ("acc", "acc_norm"):
        x = _bits(r.state["correct" if name == "acc" else "correct_norm"])
        setattr(r, name, float(x.mean()))
        setattr(r, f"{name}_stderr", _stderr(x))
        setattr(r, f"{name}_ci95", bootstrap_ci(x, seed=seed))
        if ref is not None:
            y = _bits(ref.state.get("correct" if name == "acc" else "correct_norm", ""))
            m = min(len(x), len(y))
            if m:
                d = x[:m] - y[:m]
                setattr(r, f"diff_{name}", float(d.mean()))
                setattr(r, f"diff_{name}_ci95", bootstrap_ci(d, seed=seed))
    kl = r.state.get("kl")
    r.kl = r.kl_ci95 = None
    if ref is not None and kl and len(kl) == n and r.state.get("kl_ref") == ref.kv:
        x = np.asarray(kl, dtype=np.float64)
        r.kl, r.kl_ci95 = float(x.mean()), bootstrap_ci(x, seed=seed)


def _finalize_ppl(r: EvalRecord, ref: EvalRecord | None, seed: int) -> None:
    ch = np.array(r.state.get("chunks", []), dtype=np.float64).reshape(-1, 5)
    if len(ch) == 0:
        return
    n_scored = ch[:, 3].sum()
    r.n = int(n_scored)
    _held(r, ch[:, 4])
    r.ppl = math.exp(ch[:, 0].sum() / n_scored)
    ci = bootstrap_ci(ch[:, 0] / ch[:, 3], seed=seed)
    r.ppl_ci95 = [math.exp(v) for v in ci] if ci else None
    if ref is not None:
        r.kl = float(ch[:, 1].sum() / n_scored)
        r.kl_ci95 = bootstrap_ci(ch[:, 1] / ch[:, 3], seed=seed)
        r.top1_agree = float(ch[:, 2].sum() / n_scored)


def eval_records_to_json(records: list[EvalRecord]) -> list[dict[str, Any]]:
    """The --json list (state included, so the file can be resumed)."""
    return [asdict(r) for r in records]


def read_previous(json_path: str | None, resume: bool) -> list[dict] | None:
    """The records of an earlier run to continue (--resume --json PATH); None when starting afresh."""
    import json

    if not resume:
        return None
    if not json_path:
        raise BadOption("--resume needs --json PATH (the file to continue)")
    if not Path(json_path).exists():
        return None
    try:
        previous = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadOption(f"--resume: cannot read {json_path} ({e})") from None
    if not isinstance(previous, list):
        raise BadOption(f"--resume: {json_path} is not a list of kvq eval records")
    return previous


def write_records(json_path: str | None, records: list[EvalRecord]) -> None:
    """Rewrite --json atomically with the records so far (a no-op without --json)."""
    import json

    from kvq_cli.gguf.write import atomic_output

    if not json_path:
        return
    try:
        with atomic_output(json_path) as tmp:
            tmp.write_text(json.dumps(eval_records_to_json(records), indent=1) + "\n")
    except OSError as e:
        raise OutputError(f"cannot write {json_path}: {e}") from None
