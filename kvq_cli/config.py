"""Frozen configuration dataclasses and paths shared by every stage."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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


@dataclass(frozen=True)
class RuntimeConfig:
    """How to open a model: context size, KV policy, threads."""

    n_ctx: int = 2048
    kv: str = "stock-f16"
    n_threads: int | None = None
    flash_attn: bool = False
