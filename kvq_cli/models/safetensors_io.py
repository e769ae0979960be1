"""Minimal safetensors reader (memory-mapped, lazy, bf16-aware) with truncation checks.

The `safetensors` package's NumPy API cannot load bf16, which is how SmolLM checkpoints
are stored, so we read the format directly: 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw tensor bytes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from kvq_cli.errors import ConversionError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


class SafetensorsFile:
    """Tensors of one .safetensors file, loaded on demand as float32 arrays."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ValueError("file shorter than its header")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise ValueError("header runs past the end of the file")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path.name} is not a valid safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in _DTYPES:
                raise ConversionError(f"{path.name}: tensor {name} has unsupported dtype {e['dtype']}")
            if self.data_start + end > size:
                raise ConversionError(f"{path.name} is truncated: tensor {name} ends past the end of the file")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size > self.data_start else None

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def load(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 (bf16 widened exactly)."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        raw = self._mm[self.data_start + begin: self.data_start + end]
        arr = raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])
        if e["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)


class Checkpoint:
    """All tensors of an HF checkpoint dir (single file or sharded with an index)."""

    def __init__(self, model_dir: Path):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"no *.safetensors weights in {model_dir}",
                                  hint="kvq converts safetensors checkpoints only")
        self.where: dict[str, SafetensorsFile] = {}
        for f in files:
            st = SafetensorsFile(f)
            for name in st.names():
                self.where[name] = st

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def load(self, name: str) -> np.ndarray:
        return self.where[name].load(name)
