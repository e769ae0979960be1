"""llama.cpp's own reason when it refuses a model, for kvq's one error line.

llama-cpp-python silences llama.cpp while a model loads (verbose=False) and then raises only
"Failed to load model from file"; the reason (a tensor of the wrong shape, a missing key) went to
the log. `load_errors` routes error-level log text to a list while a load runs, then gives the log
back to llama-cpp-python's handler.
"""
from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

# ggml_log_level in the vendored ggml.h (llama_cpp/_logger.py's table predates DEBUG = 1): 4 error,
# 5 continues the previous message
LOG_ERROR, LOG_CONT = 4, 5


@contextlib.contextmanager
def load_errors(llama_cpp) -> Iterator[list[str]]:
    """Yield a list that collects llama.cpp's error-level log lines while the block runs."""
    from llama_cpp import _logger

    lines: list[str] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        level = last[0] if level == LOG_CONT else level
        last[0] = level
        if level == LOG_ERROR:
            lines.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def load_reason(lines: list[str]) -> str | None:
    """The line that says why a load failed ("error loading model: ..."), else the first error line."""
    for line in lines:
        if "error loading model:" in line:
            return line.split("error loading model:", 1)[1].strip()
    return next((line for line in lines if line), None)
