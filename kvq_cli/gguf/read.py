"""Read and validate GGUF files: the check every command runs, and model dimensions."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvq_cli.errors import InvalidGGUF
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
    p = Path(path)
    if not p.exists():
        raise InvalidGGUF(f"no such file: {p}")
    if not p.is_file():
        raise InvalidGGUF(f"not a file: {p}")
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


# GGUF value types (gguf-py GGUFValueType): fixed sizes of the scalar ones; 8 = string, 9 = array
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def metadata_keys(path: str | os.PathLike) -> set[str]:
    """The metadata keys of a GGUF, read from its header without decoding any value.

    gguf-py's reader decodes every array (a tokenizer's ~50k strings take seconds); this skips
    them, so checking for a key costs milliseconds. Damaged headers raise InvalidGGUF."""
    import struct

    p = check_gguf(path)
    try:
        with p.open("rb") as f:
            def read(n: int) -> bytes:
                b = f.read(n)
                if len(b) != n:
                    raise EOFError
                return b

            def u64() -> int:
                return struct.unpack("<Q", read(8))[0]

            def skip(vtype: int) -> None:
                if vtype in _SCALAR_SIZE:
                    f.seek(_SCALAR_SIZE[vtype], 1)
                elif vtype == 8:
                    f.seek(u64(), 1)
                elif vtype == 9:
                    sub, n = struct.unpack("<I", read(4))[0], u64()
                    if sub in _SCALAR_SIZE:
                        f.seek(_SCALAR_SIZE[sub] * n, 1)
                    else:
                        for _ in range(n):
                            skip(sub)
                else:
                    raise ValueError(f"unknown value type {vtype}")

            read(4)
            version = struct.unpack("<I", read(4))[0]
            if version < 2:
                raise ValueError(f"GGUF version {version}")
            u64()   # tensor count
            keys = set()
            for _ in range(u64()):
                keys.add(read(u64()).decode("utf-8"))
                skip(struct.unpack("<I", read(4))[0])
            return keys
    except (EOFError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise InvalidGGUF(f"{p} is truncated or corrupt ({type(e).__name__}: {e})") from None


def field_value(reader, key: str, default: Any = None) -> Any:
    """The python value of a metadata field, or `default`."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def model_dims(reader) -> tuple[str, ModelDims]:
    """Architecture name and KV-relevant dims from the metadata."""
    arch = field_value(reader, Llm.ARCHITECTURE)
    if not arch:
        raise InvalidGGUF("GGUF has no general.architecture")

    def get(key: str, default: Any = None) -> Any:
        return field_value(reader, key.format(arch=arch), default)

    n_embd = int(get(Llm.EMBEDDING_LENGTH, 0))
    n_head = int(get(Llm.HEAD_COUNT, 0) or 0)
    n_head_kv = int(get(Llm.HEAD_COUNT_KV, n_head) or n_head)
    head_dim = int(get(Llm.KEY_LENGTH, 0) or (n_embd // n_head if n_head else 0))
    n_vocab = get(Llm.VOCAB_SIZE)
    if n_vocab is None:
        toks = reader.fields.get("tokenizer.ggml.tokens")
        n_vocab = len(toks.data) if toks is not None else 0
    dims = ModelDims(
        n_layer=int(get(Llm.BLOCK_COUNT, 0)), n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_ctx_train=int(get(Llm.CONTEXT_LENGTH, 0)), n_vocab=int(n_vocab),
    )
    return arch, dims
