"""Read and validate GGUF files: the check every command runs, and model dimensions."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvq_cli.errors import InvalidGGUF
from kvq_cli.gguf.header import existing_file
from kvq_cli.gguf.keys import Llm

GGUF_MAGIC = b"GGUF"
# Long arrays (vocab, merges) are summarised rather than dumped.
MAX_ARRAY_ITEMS = 8


@dataclass(frozen=True)
class ModelDims:
    """Shapes that matter for the KV cache."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    n_vocab: int

    @property
    def kv_elems_per_token(self) -> int:
        """K and V elements stored per token over all layers."""
        return 2 * self.n_layer * self.n_head_kv * self.head_dim


def summarise(value: Any) -> Any:
    """A metadata value for display: long arrays (vocab, merges) as their length and first items."""
    if isinstance(value, list) and len(value) > MAX_ARRAY_ITEMS:
        return {"array_len": len(value), "head": value[:MAX_ARRAY_ITEMS]}
    return value


def check_gguf(path: str | os.PathLike) -> Path:
    """Fail with InvalidGGUF unless `path` is an existing, readable GGUF file."""
    p = existing_file(path)
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InvalidGGUF(f"cannot read {p}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise InvalidGGUF(f"{p} is not a GGUF file (magic {magic!r})")
    return p


def read_gguf(path: str | os.PathLike):
    """Open a GGUF with gguf-py's reader, verifying every tensor lies inside the file."""
    import gguf

    p = check_gguf(path)
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on damaged headers
        raise InvalidGGUF(f"{p} is truncated or corrupt ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InvalidGGUF(f"{p} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def metadata_keys(path: str | os.PathLike) -> set[str]:
    """The metadata keys of a GGUF, read from its header (gguf.header: milliseconds, where gguf-py's
    reader decodes a tokenizer's ~50k strings in seconds). Damaged headers raise InvalidGGUF."""
    from kvq_cli.gguf.header import read_header

    return set(read_header(path).fields)


def field_value(reader, key: str, default: Any = None) -> Any:
    """The python value of a metadata field, or `default`."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _as_int(v: Any) -> int:
    """A dimension as an int: a per-layer array's first value; 0 for a missing or non-numeric one."""
    if isinstance(v, list):
        v = v[0] if v else 0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return 0
    return int(v)


def model_dims(reader) -> tuple[str, ModelDims]:
    """Architecture name and KV-relevant dims from the metadata."""
    arch = field_value(reader, Llm.ARCHITECTURE)
    if not arch or not isinstance(arch, str):
        raise InvalidGGUF("GGUF has no general.architecture")

    def get(key: str, default: Any = None) -> Any:
        return field_value(reader, key.format(arch=arch), default)

    n_embd = _as_int(get(Llm.EMBEDDING_LENGTH))
    n_head = _as_int(get(Llm.HEAD_COUNT))
    n_head_kv = _as_int(get(Llm.HEAD_COUNT_KV)) or n_head
    head_dim = _as_int(get(Llm.KEY_LENGTH)) or (n_embd // n_head if n_head else 0)
    n_vocab = get(Llm.VOCAB_SIZE)
    if n_vocab is None:
        toks = reader.fields.get("tokenizer.ggml.tokens")
        # a gguf.header.Field counts its items; a gguf-py ReaderField indexes them
        n_vocab = 0 if toks is None else toks.count if hasattr(toks, "count") else len(toks.data)
    dims = ModelDims(
        n_layer=_as_int(get(Llm.BLOCK_COUNT)), n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_ctx_train=_as_int(get(Llm.CONTEXT_LENGTH)), n_vocab=_as_int(n_vocab),
    )
    return arch, dims
