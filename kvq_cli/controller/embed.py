"""Embed stage: copy a GGUF with a controller in its `kvq.controller.*` metadata (never in place)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvq_cli.controller import ControllerSpec
from kvq_cli.errors import ControllerError, OutputError
from kvq_cli.gguf_info import model_dims, read_gguf
from kvq_cli.gguf_keys import Controller as K
from kvq_cli.gguf_write import atomic_output, copy_with_metadata

CONTROLLER_PREFIX = K.VERSION.rsplit(".", 1)[0] + "."  # "kvq.controller."


@dataclass(frozen=True)
class EmbedResult:
    """What `kvq embed` wrote."""

    out: Path
    replaced: bool  # the source already had a controller, now replaced
    size_bytes: int


def embed(model: str | Path, controller: ControllerSpec, out: str | Path,
          on_tensor: Callable[[str], None] | None = None) -> EmbedResult:
    """Write `out`: `model` with `controller` as its kvq.controller.* metadata."""
    src, dst = Path(model), Path(out)
    reader = read_gguf(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise OutputError("--out must differ from the input: kvq never edits a GGUF in place")
    replaced = any(k.startswith(CONTROLLER_PREFIX) for k in reader.fields)
    items = controller.validate().gguf_items()
    if controller.k_center is not None:
        _, d = model_dims(reader)
        got = (len(controller.k_center), len(controller.k_center[0]))
        if got != (d.n_layer, d.n_head_kv * d.head_dim):
            raise ControllerError(f"controller k_center is {got[0]}x{got[1]}, but {src.name} needs n_layer x n_embd_kv = "
                                  f"{d.n_layer}x{d.n_head_kv * d.head_dim}", hint="train the controller on this model")
    with atomic_output(dst) as tmp:
        copy_with_metadata(reader, tmp, drop=lambda k: k.startswith(CONTROLLER_PREFIX),
                           add=items, progress=on_tensor)
    return EmbedResult(out=dst, replaced=replaced, size_bytes=dst.stat().st_size)
