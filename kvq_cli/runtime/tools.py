"""llama.cpp's own tools, built from the same patched tree as the runtime and installed beside libllama."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from kvq_cli.errors import RuntimeMissing

# scripts/build_runtime.py builds the same ones
TOOLS = ("llama-server", "llama-perplexity", "llama-bench", "llama-cli")


def lib_dir() -> Path | None:
    """The llama_cpp package's lib/ (libllama.so and the tools), found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def tool_path(name: str) -> Path:
    """The installed binary of a llama.cpp tool (e.g. "llama-server"); RuntimeMissing if it is not there."""
    lib = lib_dir()
    # the venv's bin/ holds the links `make setup` makes, for an interpreter that cannot see llama_cpp
    for path in ([lib / name] if lib else []) + [Path(sys.prefix) / "bin" / name]:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RuntimeMissing(f"llama.cpp tool {name} is not installed")
