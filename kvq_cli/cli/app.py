"""The `kvq` Typer app: one error path, and the commands registered from their modules."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import typer

from kvq_cli.cli import eval_cmds, model_cmds, run_cmds, serve_cmds
from kvq_cli.errors import KvqError

app = typer.Typer(
    name="kvq",
    help="Adaptive per-token KV-cache quantization for small LLMs on-device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map KvqError (and Ctrl-C) to one stderr line and exit code 1 (130 for Ctrl-C)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KvqError as e:
            if os.environ.get("KVQ_DEBUG"):
                raise
            typer.echo(f"kvq: error: {e.one_line()}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("kvq: interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # a bug: still one line, the traceback on request
            if os.environ.get("KVQ_DEBUG"):
                raise
            msg = " ".join(str(e).split())
            typer.echo(f"kvq: internal error: {type(e).__name__}: {msg} (KVQ_DEBUG=1 shows the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


for _name, _fn in (("models", model_cmds.models_cmd), ("pull", model_cmds.pull_cmd),
                   ("convert", model_cmds.convert_cmd), ("embed", model_cmds.embed_cmd),
                   ("inspect", model_cmds.inspect_cmd), ("chat", run_cmds.chat_cmd),
                   ("bench", run_cmds.bench_cmd), ("eval", eval_cmds.eval_cmd), ("train", eval_cmds.train_cmd),
                   ("calibrate", eval_cmds.calibrate_cmd)):
    app.command(_name)(handle_errors(_fn))
# serve passes the arguments after `--` on to llama-server
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    handle_errors(serve_cmds.serve_cmd))


def main() -> None:
    """Console-script entry point."""
    app()
