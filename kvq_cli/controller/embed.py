"""Embed stage: copy a GGUF with a controller in its `kvq.controller.*` metadata (never in place)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvq_cli.controller.spec import ControllerSpec
from kvq_cli.errors import OutputError
from kvq_cli.gguf.read import model_dims, read_gguf
from kvq_cli.gguf.keys import Controller as K
from kvq_cli.gguf.write import atomic_output, copy_with_metadata

CONTROLLER_PREFIX = K.VERSION.rsplit(".", 1)[0] + "."  # "kvq.controller."


@dataclass(frozen=True)
class EmbedResult:
    """What `kvq embed` wrote."""

    out: Path
    replaced: bool  # the source already had a controller, now replaced
    size_bytes: int


def embed(model: str | Path, controller: ControllerSpec, out: str | Path,
          on_tensor: Callable[[str], None] | None = None, *, replace_input: bool = False) -> EmbedResult:
    """Write `out`: `model` with `controller` as its kvq.controller.* metadata. The file is written
    next to `out` and renamed over it when complete; with `replace_input`, `out` may be `model` itself
    (`kvq calibrate`: the renamed copy replaces the model, whose tensors it carries unchanged)."""
    src, dst = Path(model), Path(out)
    reader = read_gguf(src)
    if not replace_input and dst.exists() and dst.resolve() == src.resolve():
        raise OutputError("--out must differ from the input: kvq never edits a GGUF in place")
    replaced = any(k.startswith(CONTROLLER_PREFIX) for k in reader.fields)
    items = controller.validate().check_model(model_dims(reader)[1], src.name).gguf_items()
    with atomic_output(dst) as tmp:
        copy_with_metadata(reader, tmp, drop=lambda k: k.startswith(CONTROLLER_PREFIX),
                           add=items, progress=on_tensor)
    return EmbedResult(out=dst, replaced=replaced, size_bytes=dst.stat().st_size)


CONTROLLER_FILE_ARCH = "kvq-controller"   # general.architecture of a controller file (no tensors)


def write_controller_file(controller: ControllerSpec, out: str | Path) -> Path:
    """A controller file: a GGUF with no tensors whose metadata is the controller's kvq.controller.* keys.

    The runtime reads it as it reads an embedded controller (llama_kvq_params.controller_path), so a
    model runs with a controller without a copy of its weights."""
    import gguf

    from kvq_cli.gguf.write import add_typed

    items = controller.validate().gguf_items()
    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=CONTROLLER_FILE_ARCH)
        for key, value, kind in items:
            add_typed(writer, key, value, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
    return Path(out)
