"""Frozen configuration dataclasses and paths shared by every stage."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvq_cli.errors import BadOption


def kvq_home() -> Path:
    """Where kvq keeps converted models: $KVQ_HOME or ~/.cache/kvq."""
    return Path(os.environ.get("KVQ_HOME", Path.home() / ".cache" / "kvq"))


def models_dir() -> Path:
    """Directory of GGUF files produced by `kvq pull`/`kvq convert` for registry aliases."""
    return kvq_home() / "models"


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: an alias and the hub repo it maps to."""

    alias: str
    repo_id: str
    family: str  # "SmolLM" or "SmolLM2"
    params: str  # "135M", "360M", "1.7B"
    instruct: bool
    embedded: str | None = None  # "package:filename" of a GGUF shipped by a PyPI package


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings for chat/generation."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise BadOption(f"--max-tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise BadOption(f"--temp must be >= 0, got {self.temperature:g}")
