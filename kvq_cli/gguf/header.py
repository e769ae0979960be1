"""A GGUF's header (metadata and tensor infos) read in milliseconds, every read bounds-checked.

gguf-py's reader decodes every string of a tokenizer (~100k of them: seconds) and trusts the
counts it reads; this reader keeps the first items of long string arrays, decodes numeric arrays
with NumPy, and refuses any count or length that the rest of the file cannot hold, so a damaged
header fails in one InvalidGGUF line instead of a long loop or a huge allocation.

Layout (little-endian; gguf.cpp):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x  (string key | u32 type | value)       string = u64 length + bytes
    n_tensors x (string name | u32 n_dims | n_dims x i64 ne | i32 ggml type | u64 offset)
    padding to `general.alignment` (default 32) | tensor data, each at its offset from here
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvq_cli.errors import InvalidGGUF

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# String arrays longer than this keep only their first KEEP_STRINGS items (a tokenizer's vocab and merges).
FULL_STRING_ARRAY = 4096
KEEP_STRINGS = 8


@dataclass(frozen=True)
class Field:
    """One metadata value. `value`: a scalar, a str, or a list (arrays); `complete` is False for a
    long string array of which only the first items were decoded (`count` is its length;
    GGUFHeader.strings has them all). `contents()` as gguf-py's ReaderField, so code written for a
    GGUFReader's fields (controller_from_reader, model_dims) reads a header's too."""

    type: int
    value: Any
    item_type: int | None = None
    count: int = 1
    complete: bool = True
    span: tuple[int, int] = (0, 0)   # bytes of the whole entry (key included) in the file

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, shape (ne: innermost first, as ggml), ggml type id and data offset."""

    name: str
    ne: tuple[int, ...]
    type: int
    offset: int                      # from the start of the data section
    span: tuple[int, int] = (0, 0)


@dataclass
class GGUFHeader:
    """Everything before the tensor data; `data_offset` is where the data section starts."""

    path: Path
    file_size: int
    version: int
    fields: dict[str, Field] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0

    raw: bytes = b""                 # the file's first bytes, the whole header among them

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key, or `default`."""
        f = self.fields.get(key)
        return default if f is None else f.value

    def strings(self, key: str) -> list[bytes]:
        """Every item of a string array, undecoded (a long one's `value` holds only its first items)."""
        f = self.fields[key]
        pos = f.span[0] + 8 + struct.unpack_from("<Q", self.raw, f.span[0])[0] + 16   # key, type, item type, count
        out = []
        for _ in range(f.count):
            n = struct.unpack_from("<Q", self.raw, pos)[0]
            out.append(self.raw[pos + 8:pos + 8 + n])
            pos += 8 + n
        return out


class _NeedMore(Exception):
    """The header goes on past the bytes read so far."""


class _Cursor:
    """Reads little-endian values from the file's first bytes `buf`, failing on anything past the
    end of the file (`size`)."""

    def __init__(self, buf: bytes, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"{what} would run past the end of the file")
        if self.pos + n > len(self.buf):
            raise _NeedMore

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str, decode: bool = True) -> str | None:
        n = self.unpack("<Q", what)
        self.need(n, what)
        s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace") if decode else None
        self.pos += n
        return s


def _shown(name: str) -> str:
    """A key or tensor name as messages show it: control characters as '?', at most 80 characters."""
    name = "".join(ch if ch.isprintable() else "?" for ch in name)
    return name if len(name) <= 80 else name[:77] + "..."


def _array(c: _Cursor, key: str) -> tuple[int, list, int, bool]:
    import numpy as np

    sub = c.unpack("<I", f"{key}'s array type")
    n = c.unpack("<Q", f"{key}'s array length")
    if sub == STRING:
        c.need(8 * n, f"{key}'s {n} strings")   # every string has at least its length
        keep = n if n <= FULL_STRING_ARRAY else KEEP_STRINGS
        items = [c.string(key, decode=i < keep) for i in range(n)]
        return sub, items[:keep], n, keep == n
    if sub not in SCALAR_FORMATS:
        raise ValueError(f"{key} is an array of unsupported type {sub}")
    size = struct.calcsize(SCALAR_FORMATS[sub])
    c.need(size * n, f"{key}'s {n} values")
    arr = np.frombuffer(c.buf, dtype=np.dtype(SCALAR_FORMATS[sub]), count=n, offset=c.pos)
    c.pos += size * n
    return sub, arr.tolist(), n, True


def _read(buf: bytes, size: int, path: Path) -> GGUFHeader:
    c = _Cursor(buf, size)
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (kvq reads versions 2 and 3, little-endian)")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the metadata count")
    head = GGUFHeader(path=path, file_size=size, version=version, raw=buf)
    c.need(13 * n_kv, f"{n_kv} metadata entries")   # key length, type and at least one byte each
    for _ in range(n_kv):
        start = c.pos
        key = c.string("a metadata key")
        shown = _shown(key)
        vtype = c.unpack("<I", f"{shown}'s type")
        if vtype in SCALAR_FORMATS:
            f = Field(vtype, c.unpack(SCALAR_FORMATS[vtype], shown))
        elif vtype == STRING:
            f = Field(vtype, c.string(shown))
        elif vtype == ARRAY:
            sub, items, n, complete = _array(c, shown)
            f = Field(vtype, items, sub, n, complete)
        else:
            raise ValueError(f"{shown} has unknown value type {vtype}")
        if key in head.fields:
            raise ValueError(f"duplicate metadata key {shown}")
        head.fields[key] = Field(f.type, f.value, f.item_type, f.count, f.complete, (start, c.pos))
    c.need(24 * n_tensors, f"{n_tensors} tensor infos")
    for _ in range(n_tensors):
        start = c.pos
        name = _shown(c.string("a tensor name"))   # (names longer than 63 bytes are invalid anyway)
        n_dims = c.unpack("<I", f"tensor {name}'s dims")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        ne = tuple(c.unpack("<q", f"tensor {name}'s shape") for _ in range(n_dims))
        ttype = c.unpack("<i", f"tensor {name}'s type")
        offset = c.unpack("<Q", f"tensor {name}'s offset")
        head.tensors.append(TensorInfo(name, ne, ttype, offset, (start, c.pos)))
    align = head.fields.get("general.alignment")
    if align is not None:
        if align.type != 4 or align.value <= 0 or align.value & (align.value - 1):
            raise ValueError(f"general.alignment {align.value!r} is not a power of two (u32)")
        head.alignment = align.value
    head.data_offset = -(-c.pos // head.alignment) * head.alignment
    return head


def existing_file(path: str | os.PathLike) -> Path:
    """`path` if it names an existing file, else InvalidGGUF (one line)."""
    p = Path(path)
    if not p.exists():
        raise InvalidGGUF(f"no such file: {p}")
    if not p.is_file():
        raise InvalidGGUF(f"not a file: {p}")
    return p


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF's header; InvalidGGUF (one line) if it is missing, not GGUF, truncated or corrupt."""
    p = existing_file(path)
    try:
        with p.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            chunk = 1 << 22   # headers are a few MiB at most (a 150k-token vocab); read more only if needed
            while True:
                f.seek(0)
                buf = f.read(min(chunk, size))
                if buf[:4] != GGUF_MAGIC:
                    raise InvalidGGUF(f"{p} is not a GGUF file (magic {buf[:4]!r})")
                try:
                    return _read(buf, size, p)
                except _NeedMore:
                    chunk *= 8
    except OSError as e:
        raise InvalidGGUF(f"cannot read {p}: {e.strerror or e}") from None
    except (ValueError, struct.error, OverflowError, MemoryError) as e:
        raise InvalidGGUF(f"{p} is truncated or corrupt ({e})") from None
