"""Options shared by several commands (defined once), and the stderr console and progress bars."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from kvq_cli.runtime.kv import DEFAULT_KV

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Registry alias (see `kvq models`), hub id, or path to a .gguf file. "
         "Default: smollm2-135m-instruct (embedded).", show_default=False)]
KvOpt = Annotated[Optional[str], typer.Option("--kv", show_default=f"{DEFAULT_KV}, or adaptive at --kv-bits", help="KV cache policy: adaptive (the learned per-token precisions: the GGUF's own controller, else the one kvq ships for the model, else the generic one), f16, q8, q4, q2 (kvq pools, static), rule, or stock llama.cpp caches stock-f16, stock-f16-fa (flash attention on), stock-q8_0, stock-q4_0, stock-q2_0. kvq policies take @BITS (adaptive@3).")]
KvBitsOpt = Annotated[Optional[float], typer.Option("--kv-bits", help="kvq memory budget in bits per KV element at full context (a full pool demotes, never overflows); adaptive also steers its choices to land on it.")]
KvCenterOpt = Annotated[str, typer.Option("--kv-center", help="kvq: subtract the controller's mean K per layer before storing K (attention is unchanged; quantized rows lose less): auto (rule/adaptive/oracle), on (every kvq policy) or off.")]
KvWindowOpt = Annotated[Optional[int], typer.Option("--kv-window", help="kvq: recent tokens kept at --kv-window-bits before a precision decision (default 0 for static; rule/adaptive: ctx/16 within 32-128, 32 with --kv-window-bits 16; oracle 32).")]
KvWindowBitsOpt = Annotated[Optional[int], typer.Option("--kv-window-bits", help="kvq: precision of the window rows, paid for in the budget: 16 (f16) or 8 (q8_0, 8.5 bits/element). Default 8 for rule/adaptive, 16 otherwise.")]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Context size in tokens (0 = the model's training context).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed (same seed, same output).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")]
OutTypeOpt = Annotated[str, typer.Option("--outtype", help="GGUF weight type: f16, q8_0 or q4_0.")]
CalibTokensOpt = Annotated[Optional[int], typer.Option("--calib-tokens", help="Calibration tokens to learn from (default 57344: 12 chunks of 1,024 and 512 short prompts); fewer is faster and rougher.", show_default=False)]
NoCalibrateOpt = Annotated[bool, typer.Option("--no-calibrate", help="Do not calibrate a controller for a model kvq ships none for (`--kv adaptive` then runs the generic one; `kvq calibrate` later).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def stderr_console():
    """The one console for progress, notes and logs (stdout carries results only)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)   # a note is one line, whatever the width


def progress():
    """A rich progress bar on stderr with counts and ETA, drawn only on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = stderr_console()
    # piped stderr keeps just the result and error lines
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)


def tensor_progress(bar, what: str):
    """An on_tensor(name, i, n) callback that advances a task of `bar`."""
    task = bar.add_task(what, total=None)

    def on_tensor(name: str, i: int, n: int) -> None:
        bar.update(task, completed=i, total=n, description=f"{what} {name}")

    return on_tensor
