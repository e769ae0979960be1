"""Session files: an Engine's KV cache and the tokens it holds, in llama.cpp's own state format
(llama_state_save_file / llama_state_load_file, the files llama-cli's --prompt-cache writes).

A kvq cache is saved whole (pools, window, decisions, the price and the controller's statistics),
so a restored session continues exactly as the saved one would have. A file saved with another
cache policy, controller or model, a stock llama.cpp state loaded into a kvq cache (or the other
way round) and a corrupted file are refused with llama.cpp's or kvq's reason.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from kvq_cli.errors import StateError
from kvq_cli.gguf.write import atomic_output
from kvq_cli.runtime.engine import Engine


def save_state(engine: Engine, path: str | os.PathLike) -> Path:
    """Write the engine's cache and cached tokens to `path` (atomically)."""
    import llama_cpp

    n = engine.n_tokens
    toks = (llama_cpp.llama_token * max(n, 1))(*engine.llm.input_ids[:n].tolist())
    with atomic_output(path) as tmp:
        if not llama_cpp.llama_state_save_file(engine.llm.ctx, str(tmp).encode(), toks, n):
            raise StateError(f"llama.cpp could not write the state to {path}")
    return Path(path)


def load_state(engine: Engine, path: str | os.PathLike) -> list[int]:
    """Restore a session file into the engine; returns the tokens it holds."""
    import llama_cpp

    from kvq_cli.runtime._lib import kvq_lib

    p = Path(path)
    if not p.is_file():
        raise StateError(f"no session file at {p}")
    lib = kvq_lib()
    lib.llama_kvq_clear_error()
    cap = engine.n_ctx
    toks = (llama_cpp.llama_token * cap)()
    n_out = ctypes.c_size_t(0)
    ok = llama_cpp.llama_state_load_file(engine.llm.ctx, str(p).encode(), toks, cap, ctypes.byref(n_out))
    if not ok:
        why = lib.llama_kvq_last_error()
        reason = why.decode("utf-8", "replace") if why else "not a state of this model and context (or corrupted)"
        engine.truncate(0)
        raise StateError(f"cannot restore {p}: {reason}")
    n = int(n_out.value)
    engine.llm.input_ids[:n] = toks[:n]
    engine.llm.n_tokens = n
    return list(toks[:n])
