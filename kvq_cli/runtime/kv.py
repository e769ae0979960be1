"""KV-cache policies accepted by `--kv`, and their honest storage cost."""
from __future__ import annotations

from dataclasses import dataclass

from kvq_cli.errors import BadOption


@dataclass(frozen=True)
class KvPolicy:
    """A parsed `--kv` value."""

    name: str
    ggml_type: str          # ggml type name of the stock cache ("F16", "Q8_0", "Q4_0")
    bits_per_elem: float    # bytes held per element x 8, block scales included
    needs_flash: bool       # quantized V is only supported by the flash-attention path


# ggml block layouts: q8_0 = 32 x int8 + f16 scale (34 B / 32), q4_0 = 32 x 4 bit + f16 scale (18 B / 32).
STOCK_POLICIES: dict[str, KvPolicy] = {
    "stock-f16": KvPolicy("stock-f16", "F16", 16.0, False),
    "stock-q8_0": KvPolicy("stock-q8_0", "Q8_0", 34 * 8 / 32, True),
    "stock-q4_0": KvPolicy("stock-q4_0", "Q4_0", 18 * 8 / 32, True),
}

KV_CHOICES = list(STOCK_POLICIES)


def parse_kv(value: str) -> KvPolicy:
    """Parse one `--kv` value, failing with BadOption that lists the valid ones."""
    key = value.strip().lower()
    if key in STOCK_POLICIES:
        return STOCK_POLICIES[key]
    raise BadOption(f"unknown --kv value '{value}'", hint=f"choose one of: {', '.join(KV_CHOICES)}")


def parse_kv_list(value: str) -> list[KvPolicy]:
    """Parse a comma-separated `--kv` list."""
    items = [v for v in value.split(",") if v.strip()]
    if not items:
        raise BadOption("empty --kv list", hint=f"choose from: {', '.join(KV_CHOICES)}")
    return [parse_kv(v) for v in items]
