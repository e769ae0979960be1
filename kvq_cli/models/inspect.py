"""`kvq inspect`: what a GGUF file holds, its kvq metadata and embedded controller included."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvq_cli.controller.spec import controller_from_reader
from kvq_cli.errors import ControllerError
from kvq_cli.gguf.keys import KVQ_PREFIX, Llm
from kvq_cli.gguf.read import ModelDims, summarise, field_value, model_dims, read_gguf


@dataclass
class GGUFInfo:
    """What `kvq inspect` reports about a file."""

    path: str
    size_bytes: int
    gguf_version: int
    architecture: str
    name: str | None
    dims: ModelDims
    n_tensors: int
    tensor_types: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)
    kvq: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        from dataclasses import asdict

        d = asdict(self)
        d["dims"]["kv_elems_per_token"] = self.dims.kv_elems_per_token
        return d


def _controller_summary(reader) -> dict[str, Any] | None:
    """Version, features, shapes and budget of an embedded controller (or why it is invalid)."""
    try:
        c = controller_from_reader(reader)
    except ControllerError as e:
        return {"error": e.one_line()}
    if c is None:
        return None
    return {"version": c.version, "features": c.features, "precisions": c.precisions,
            "w1": [c.hidden, len(c.features)], "w2": [len(c.precisions), c.hidden],
            "budget_bits": c.budget_bits, "granularity": c.granularity, "k_center": c.k_center is not None,
            "norm_prior": c.norm_prior}


def inspect_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Architecture, dims, tensor types and metadata (incl. `kvq.*`) of a GGUF file."""
    reader = read_gguf(path)
    arch, dims = model_dims(reader)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    meta: dict[str, Any] = {}
    kvq: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = f.contents()
        except Exception:  # an unreadable value is reported, not fatal for inspect
            value = "<unreadable>"
        if key.startswith(KVQ_PREFIX):
            kvq[key] = value if not isinstance(value, list) else summarise(value)
        else:
            meta[key] = summarise(value)
    return GGUFInfo(
        controller=_controller_summary(reader), path=str(path), size_bytes=Path(path).stat().st_size,
        gguf_version=int(field_value(reader, "GGUF.version", 0)), architecture=arch,
        name=field_value(reader, Llm.NAME), dims=dims, n_tensors=len(reader.tensors),
        tensor_types=dict(sorted(types.items())), metadata=meta, kvq=kvq,
    )
