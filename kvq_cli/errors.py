"""One error path: every expected failure is a KvqError that the CLI renders as one line."""
from __future__ import annotations


class KvqError(Exception):
    """Base of all expected kvq failures; `hint` is shown after the message."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        msg = " ".join(str(self).split())
        return f"{msg} (hint: {self.hint})" if self.hint else msg


class UnknownModel(KvqError):
    """A model name that is neither a registry alias nor an existing file."""


class ModelNotDownloaded(KvqError):
    """A known model whose files are not on this machine yet."""


class DownloadError(KvqError):
    """The hub download failed or the hub could not be reached."""


class InvalidGGUF(KvqError):
    """A file that is missing, not GGUF, or truncated."""


class ConversionError(KvqError):
    """An HF checkpoint could not be converted to GGUF."""


class ControllerError(KvqError):
    """Controller weights or metadata are missing or malformed."""


class BadOption(KvqError):
    """An option value the command cannot use (bad --kv, bad --ctx, ...)."""


class RuntimeMissing(KvqError):
    """The llama.cpp runtime (or a patched symbol) is not installed."""

    hint = "run `make setup` (builds the kvq runtime from patches/llama.cpp)"


class ContextOverflow(KvqError):
    """The prompt does not fit the context window."""


class StateError(KvqError):
    """A session (KV cache state) file that cannot be restored into this context."""


class OutputError(KvqError):
    """An output file could not be written (permissions, disk full, bad path)."""


def run_script(main) -> int:
    """A script's main() with expected failures (kvq errors, unreadable files) as one stderr line and exit 1."""
    import sys

    try:
        return main()
    except KvqError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
