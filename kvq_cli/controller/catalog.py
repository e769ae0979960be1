"""Which controller a model runs `--kv adaptive` with: the one resolution path of every entry point.

In order:
1. **embedded**: the GGUF's own `kvq.controller.*` metadata (`kvq calibrate`, `kvq embed`, or
   `kvq pull`/`kvq convert`, which calibrate or embed one);
2. **shipped**: the controller kvq ships for the model's registry alias
   (`kvq_cli/controller/shipped/ALIAS.json`);
3. **generic**: the model-agnostic controller (`shipped/generic.json`), which normalises its
   features with statistics of the model it runs on, measured as it decodes
   (`kvq.controller.norm_prior`). It carries no K centering (a model-specific vector), so any
   llama-architecture GGUF runs adaptive at once; `kvq calibrate MODEL` makes a model-specific one.

`models.registry.model_ref` applies it with the alias; `runtime.engine.Engine` applies it to a bare
path (the Python API, `Engine("model.gguf", kv=parse_kv("adaptive"))`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvq_cli.gguf.keys import Controller as K

SHIPPED_DIR = Path(__file__).parent / "shipped"
GENERIC = SHIPPED_DIR / "generic.json"


@dataclass(frozen=True)
class ControllerSource:
    """Where a model's controller comes from; `path` is the controller JSON kvq supplies (None: embedded)."""

    kind: str
    path: Path | None = None

    def describe(self) -> str:
        """For banners: 'embedded', 'shipped for ALIAS' or 'generic (...)'."""
        if self.kind == "shipped" and self.path is not None:
            return f"shipped for {self.path.stem}"
        if self.kind == "generic":
            return "generic (`kvq calibrate` makes a model-specific one)"
        return self.kind


def shipped_path(alias: str | None) -> Path | None:
    """The controller kvq ships for a registry alias, if any."""
    if not alias:
        return None
    p = SHIPPED_DIR / f"{alias}.json"
    return p if p.is_file() else None


def has_embedded(gguf: str | os.PathLike) -> bool:
    """Whether a GGUF carries a controller in its metadata (header scan, milliseconds)."""
    from kvq_cli.gguf.read import metadata_keys

    return K.VERSION in metadata_keys(gguf)


def find_controller(gguf: str | os.PathLike, alias: str | None = None) -> ControllerSource:
    """The controller `--kv adaptive` runs `gguf` with: embedded, else shipped for `alias`, else generic."""
    if has_embedded(gguf):
        return ControllerSource("embedded")
    shipped = shipped_path(alias)
    if shipped is not None:
        return ControllerSource("shipped", shipped)
    if GENERIC.is_file():
        return ControllerSource("generic", GENERIC)
    return ControllerSource("none")   # (a build without the generic controller: the runtime says none is there)
