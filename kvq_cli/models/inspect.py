"""`kvq inspect`: what a GGUF file holds, its kvq metadata and embedded controller included."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvq_cli.controller.spec import controller_from_reader
from kvq_cli.errors import ControllerError, InvalidGGUF
from kvq_cli.gguf.header import read_header
from kvq_cli.gguf.keys import KVQ_PREFIX, Llm
from kvq_cli.gguf.preflight import TRUNCATED, model_problems, type_name
from kvq_cli.gguf.read import MAX_ARRAY_ITEMS, ModelDims, field_value, model_dims, summarise


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
    problems: list[str] = field(default_factory=list)   # why llama.cpp would refuse it (gguf.preflight)

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
    """Architecture, dims, tensor types, metadata (incl. `kvq.*`) and load problems of a GGUF file."""
    head = read_header(path)
    problems = model_problems(head)
    cut = next((p for p in problems if p.endswith(TRUNCATED)), None)
    if cut:   # an incomplete file (a copy or download cut short): not a model to describe
        raise InvalidGGUF(f"{path}: {cut}")
    try:
        arch, dims = model_dims(head)
    except InvalidGGUF:   # no architecture: what the file holds is still worth showing (problems say why)
        arch, dims = "", ModelDims(0, 0, 0, 0, 0, 0, 0)
    types = Counter(type_name(t.type) for t in head.tensors)
    meta: dict[str, Any] = {}
    kvq: dict[str, Any] = {}
    for key, f in head.fields.items():
        # a long string array (vocab, merges) was read only in part: its length and first items
        value = summarise(f.value) if f.complete else {"array_len": f.count, "head": f.value[:MAX_ARRAY_ITEMS]}
        (kvq if key.startswith(KVQ_PREFIX) else meta)[key] = value
    return GGUFInfo(
        controller=_controller_summary(head), path=str(path), size_bytes=head.file_size,
        gguf_version=head.version, architecture=arch, name=field_value(head, Llm.NAME),
        dims=dims, n_tensors=len(head.tensors), tensor_types=dict(sorted(types.items())), metadata=meta, kvq=kvq,
        problems=problems,
    )
