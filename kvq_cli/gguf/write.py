"""Writing GGUF files: atomic outputs, typed metadata, copy-with-new-metadata (gguf_new_metadata.py style)."""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from kvq_cli.errors import OutputError


def check_output(path: str | os.PathLike) -> Path:
    """Fail now (not after a long run) if `path` cannot become an output file."""
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"output {out} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}: permission denied")
    return out


def _temp_prefix(out: Path) -> str:
    """Temp files of `out` are named .NAME.kvq-PID-XXXXXXXX.tmp: hidden, and naming their writer."""
    return f".{out.name}.kvq-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temp files earlier writers of `out` left when killed before their rename (SIGKILL,
    OOM, power loss): those whose writer pid no longer runs on this machine. Returns what it removed."""
    parent = out.parent if str(out.parent) else Path(".")
    prefix = _temp_prefix(out)
    removed = []
    for p in parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds.

    Any failure (including Ctrl-C) removes the temp file, so no partial output ever exists. A writer
    killed outright (SIGKILL) cannot clean up: its hidden temp file names its pid, and the next write
    of the same output removes it (remove_stale_temps).
    """
    out = check_output(path)
    parent = out.parent if str(out.parent) else Path(".")
    remove_stale_temps(out)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f"{_temp_prefix(out)}{os.getpid()}-", suffix=".tmp")
    except OSError as e:
        raise _output_error(out, e) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give the output the usual umask mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except OSError as e:
        raise _output_error(out, e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _output_error(out: Path, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"cannot write {out}: no space left on device")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {out}: permission denied")
    return OutputError(f"cannot write {out}: {e.strerror or e}")


def add_typed(writer, key: str, value: Any, kind: str) -> None:
    """Add one metadata value with an explicit GGUF type ('u32', 'f32', 'str', 'f32[]', 'i32[]', 'str[]')."""
    import gguf

    T = gguf.GGUFValueType
    if kind == "u32":
        writer.add_uint32(key, int(value))
    elif kind == "f32":
        writer.add_float32(key, float(value))
    elif kind == "str":
        writer.add_string(key, str(value))
    elif kind.endswith("[]"):
        sub = {"f32[]": T.FLOAT32, "i32[]": T.INT32, "str[]": T.STRING}[kind]
        writer.add_key_value(key, list(value), T.ARRAY, sub_type=sub)
    else:
        raise ValueError(f"unknown metadata kind {kind}")


def copy_with_metadata(reader, dst: Path, *, drop: Callable[[str], bool],
                       add: Iterable[tuple[str, Any, str]], progress: Callable[[str], None] | None = None) -> None:
    """Write `dst` as a copy of `reader`'s file: same tensors and metadata, minus `drop`, plus `add`."""
    import gguf

    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    align = reader.fields.get("general.alignment")
    if align is not None:
        writer.data_alignment = int(align.contents())
    for key, f in reader.fields.items():
        # GGUF.* are header fields; the writer adds general.architecture itself.
        if key.startswith("GGUF.") or key == "general.architecture" or drop(key):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for key, value, kind in add:
        add_typed(writer, key, value, kind)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
        if progress:
            progress(t.name)
    writer.close()
