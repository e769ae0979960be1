"""KV-cache policies accepted by `--kv`, and their honest storage cost."""
from __future__ import annotations

from dataclasses import dataclass, replace

from kvq_cli.errors import BadOption


@dataclass(frozen=True)
class KvPolicy:
    """A parsed `--kv` value: a stock llama.cpp cache type, or a kvq policy over precision pools."""

    name: str
    ggml_type: str = "F16"        # stock cache type (kvq policies leave the stock cache unused)
    bits_per_elem: float = 16.0   # stock: bytes held per element x 8, block scales included
    needs_flash: bool = False     # stock: run llama.cpp's flash-attention path (quantized V needs it)
    kvq: str | None = None        # None (stock) | "static" | "rule" | "adaptive" | "assign" (oracle)
    static_bits: int = 16         # kvq static precision
    budget_bits: float | None = None  # kvq: this policy's own --kv-bits ("rule@3")
    precisions: tuple[int, ...] | None = None  # oracle: the pools it allocates over (None: 2/4/8/16)

    @property
    def is_stock(self) -> bool:
        return self.kvq is None


# ggml block layouts: q8_0 = 32 x int8 + f16 scale (34 B / 32), q4_0 = 32 x 4 bit + f16 scale
# (18 B / 32), q2_0 = 64 x 2 bit + f16 scale (18 B / 64).
STOCK_POLICIES: dict[str, KvPolicy] = {
    "stock-f16": KvPolicy("stock-f16", "F16", 16.0, False),
    "stock-f16-fa": KvPolicy("stock-f16-fa", "F16", 16.0, True),   # f16 with flash attention on
    "stock-q8_0": KvPolicy("stock-q8_0", "Q8_0", 34 * 8 / 32, True),
    "stock-q4_0": KvPolicy("stock-q4_0", "Q4_0", 18 * 8 / 32, True),
    "stock-q2_0": KvPolicy("stock-q2_0", "Q2_0", 18 * 8 / 64, True),
}
# kvq pools: f16, q8_0, q4_0, kvq2 (per 64 values one f16 step and 16 bytes, each group of 4 one of
# 256 codewords: 18 B / 64 = 2.25 bits), and
# k4v2 (bits 3): K in q4_0, V in kvq2, 3.375 bits/element (K errors move every score, V errors one
# output term: at 2 bits the K side does ~5x the damage, results/pool_candidates.txt).
KVQ_POLICIES: dict[str, KvPolicy] = {
    "f16": KvPolicy("f16", kvq="static", static_bits=16),
    "q8": KvPolicy("q8", kvq="static", static_bits=8),
    "q4": KvPolicy("q4", kvq="static", static_bits=4),
    "k4v2": KvPolicy("k4v2", kvq="static", static_bits=3),
    "q2": KvPolicy("q2", kvq="static", static_bits=2),
    "rule": KvPolicy("rule", kvq="rule"),
    "adaptive": KvPolicy("adaptive", kvq="adaptive"),
    # evaluation only (kvq eval): the damage-optimal assignment measured on the scored text
    # itself with every later query known (kvq_cli/train/oracle.py), an upper bound
    "oracle": KvPolicy("oracle", kvq="assign"),
    # the same with the k4v2 pool among its choices
    "oracle+k4v2": KvPolicy("oracle+k4v2", kvq="assign", precisions=(2, 3, 4, 8, 16)),
    # the same with eviction among its choices (bits 0: the row is left out)
    "oracle+drop": KvPolicy("oracle+drop", kvq="assign", precisions=(0, 2, 4, 8, 16)),
}
EVAL_ONLY = ("oracle", "oracle+k4v2", "oracle+drop")
# what chat, bench and serve run without --kv: the adaptive cache at this budget (bits/element)
DEFAULT_BUDGET = 3.5
DEFAULT_KV = f"adaptive@{DEFAULT_BUDGET:g}"
ALL_POLICIES = {**KVQ_POLICIES, **STOCK_POLICIES}
KV_CHOICES = list(ALL_POLICIES)


def parse_kv(value: str) -> KvPolicy:
    """Parse one `--kv` value, failing with BadOption that lists the valid ones.

    A kvq policy may carry its own budget: `rule@3` is `rule` with --kv-bits 3, so
    policies at different budgets run side by side in one command.
    """
    key = value.strip().lower()
    name, at, bits = key.partition("@")
    if name not in ALL_POLICIES:
        raise BadOption(f"unknown --kv value '{value}'",
                        hint=f"choose one of: {', '.join(KV_CHOICES)} (kvq policies take @BITS, e.g. rule@3)")
    policy = ALL_POLICIES[name]
    if not at:
        return policy
    if policy.is_stock:
        raise BadOption(f"--kv {value}: a stock cache has a fixed size; @BITS applies to kvq policies")
    try:
        budget = float(bits)
    except ValueError:
        raise BadOption(f"--kv {value}: @BITS takes a number of bits per element, e.g. {name}@3") from None
    check_budget(budget, f"--kv {value}")
    return replace(policy, name=f"{name}@{budget:g}", budget_bits=budget)


def default_kv(kv: str | None, kv_bits: float | None = None) -> str:
    """A `--kv` value, or the default when none was given: adaptive at --kv-bits, else at DEFAULT_BUDGET."""
    if kv is not None:
        return kv
    return "adaptive" if kv_bits is not None else DEFAULT_KV


def require_online(policies: list[KvPolicy]) -> None:
    """Refuse evaluation-only policies where text arrives as it is decoded (chat, bench, lm-eval)."""
    for p in policies:
        if p.name.split("@")[0] in EVAL_ONLY:
            raise BadOption(f"--kv {p.name} is for `kvq eval` only (it needs the text in advance)")


def check_budget(bits: float, what: str = "--kv-bits") -> None:
    """Budgets are bits per KV element between the smallest pool (2-bit) and f16."""
    if not (2.0 <= bits <= 16.0):
        raise BadOption(f"{what}: the budget must be between 2 and 16 bits per element, got {bits:g}")


def parse_kv_list(value: str, *, online: bool = True) -> list[KvPolicy]:
    """Parse a comma-separated `--kv` list (each policy once: records are keyed by its name); with
    `online`, evaluation-only policies are refused (require_online)."""
    items = [v for v in value.split(",") if v.strip()]
    if not items:
        raise BadOption("empty --kv list", hint=f"choose from: {', '.join(KV_CHOICES)}")
    policies = [parse_kv(v) for v in items]
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise BadOption(f"--kv lists a policy twice: {value}")
    if online:
        require_online(policies)
    return policies


@dataclass(frozen=True)
class KvqOptions:
    """Knobs of the kvq pools: window W (None = policy default), budget in bits/element."""

    window: int | None = None
    budget_bits: float | None = None
    per_layer: bool = False
    trace: bool = False
    rotate: bool = True
    attn_ref: bool = False   # reference attention kernel instead of the fused one (tests, A/B)
    record_q: bool = False   # keep every query row (Engine.queries; the training oracle)
    price_step: float | None = None  # adaptive with a budget: how fast the price per bit moves (None: runtime default)
    # K centering with the model's kvq.controller.k_center (None: on for mixed-precision policies,
    # off for static ones, whose rows then match the stock caches of their type)
    k_center: bool | None = None
    # query-aware rounding of K rows leaving the window into the 2/4-bit pools (> 0: the weight of
    # plain squared error against the error along the attending queries; 0: plain rounding;
    # None: the runtime default)
    qar_mu: float | None = None
    # precision of the window rows: 16 (f16) or 8 (q8_0, 8.5 bits); None: 8 where the window feeds
    # decisions (rule, adaptive: the bits saved go to the decided rows), else 16
    window_bits: int | None = None
    # V rows of the 2/4-bit pools stored with block scales that leave each block's projection on the
    # original exact (the least-squares scale shrinks it by its relative error, ~11% at 2 bits, and
    # attention adds that shrink up). None: on for mixed-precision policies, off for static ones
    v_unbias: bool | None = None

    def k_center_for(self, policy: KvPolicy) -> bool:
        return self.k_center if self.k_center is not None else policy.kvq != "static"

    def v_unbias_for(self, policy: KvPolicy) -> bool:
        return self.v_unbias if self.v_unbias is not None else policy.kvq != "static"

    def budget_for(self, policy: KvPolicy) -> float | None:
        """The policy's own budget (`rule@3`), else --kv-bits; None for stock caches."""
        if policy.is_stock:
            return None
        return policy.budget_bits if policy.budget_bits is not None else self.budget_bits

    def window_for(self, policy: KvPolicy, n_ctx: int | None = None) -> int:
        """Default W: 0 for static policies (stock semantics); where decisions use attention 32, or
        for rule/adaptive with their q8_0 window n_ctx / 16 within [32, 128] (the window costs
        about 0.5 bit/element at full context; W = 128 at 2,048 tokens, results/window_bits_probe*.json)."""
        if self.window is not None:
            return self.window
        if policy.kvq == "static":
            return 0
        if n_ctx and self.window_bits_for(policy) == 8:
            return min(128, max(32, n_ctx // 16))
        return 32

    def window_bits_for(self, policy: KvPolicy) -> int:
        """Bits of the window rows: q8_0 (8) for rule/adaptive, f16 (16) for static and oracle caches."""
        if self.window_bits is not None:
            return self.window_bits
        return 8 if policy.kvq in ("rule", "adaptive") else 16


def kvq_options(policies: list[KvPolicy], kv_bits: float | None = None, kv_window: int | None = None,
                kv_center: str = "auto", kv_window_bits: int | None = None) -> KvqOptions:
    """KvqOptions from the --kv-bits/--kv-window/--kv-window-bits/--kv-center flags, checked against the policies."""
    if kv_center not in ("auto", "on", "off"):
        raise BadOption(f"--kv-center must be auto, on or off, got {kv_center}")
    if ((kv_bits is not None or kv_window is not None or kv_window_bits is not None or kv_center != "auto")
            and all(p.is_stock for p in policies)):
        raise BadOption("--kv-bits/--kv-window/--kv-window-bits/--kv-center apply to kvq policies, not "
                        + ", ".join(p.name for p in policies))
    if kv_bits is not None:
        check_budget(kv_bits)
    if kv_window is not None and kv_window < 0:
        raise BadOption(f"--kv-window must be >= 0, got {kv_window}")
    if kv_window_bits is not None and kv_window_bits not in (8, 16):
        raise BadOption(f"--kv-window-bits must be 16 or 8, got {kv_window_bits}")
    return KvqOptions(window=kv_window, budget_bits=kv_bits, k_center={"auto": None, "on": True, "off": False}[kv_center],
                      window_bits=kv_window_bits)
