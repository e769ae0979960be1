"""`kvq serve`: llama.cpp's llama-server on a kvq cache."""
from __future__ import annotations

import signal
from typing import Annotated

import typer

from kvq_cli.cli.options import KvBitsOpt, KvOpt, KvWindowOpt, ModelArg, ThreadsOpt, stderr_console

ParallelOpt = Annotated[int, typer.Option("--parallel", "-np", help="Parallel slots: requests served at once, each with its own sequence in the one cache.")]
HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")]
PortOpt = Annotated[int, typer.Option("--port", help="Port to listen on (0: a free one).")]


def serve_cmd(
    typer_ctx: typer.Context,
    model: ModelArg = None,
    kv: KvOpt = None,
    kv_bits: KvBitsOpt = None,
    kv_window: KvWindowOpt = None,
    parallel: ParallelOpt = 4,
    ctx: Annotated[int, typer.Option("--ctx", help="Context per slot in tokens (the server holds parallel x ctx).")] = 2048,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8080,
    threads: ThreadsOpt = None,
) -> None:
    """Serve a model with llama.cpp's llama-server (OpenAI-compatible API) on a kvq cache; Ctrl-C stops it.

    Arguments after `--` go to llama-server as they are: `-- --context-shift` (a full slot drops its oldest half and goes on), `-- --slot-save-path DIR` (slot save/restore).

    Example: kvq serve smollm2-135m --kv adaptive@3 --parallel 4 --port 8080
    """
    from kvq_cli.cli.run_cmds import note_generic, resolve_or_pull
    from kvq_cli.errors import BadOption
    from kvq_cli.models.registry import model_ref
    from kvq_cli.runtime.kv import default_kv, parse_kv_list
    from kvq_cli.runtime.server import Server, ServeConfig, ServerError

    policies = parse_kv_list(default_kv(kv, kv_bits))
    if len(policies) != 1:
        raise BadOption(f"serve takes one --kv policy, got {kv}")
    policy = policies[0]
    cfg = ServeConfig(policy=policy, parallel=parallel, ctx=ctx, host=host, port=port, threads=threads,
                      kv_window=kv_window, kv_bits=kv_bits if policy.budget_bits is None else None,
                      extra=tuple(typer_ctx.args))
    cfg.check()
    err = stderr_console()
    resolved = resolve_or_pull(model, err)
    ref = model_ref(resolved, [policy])
    if policy.kvq == "adaptive":
        note_generic(ref, err)
    server = Server(ref, cfg)
    stop = {"signal": None}

    def on_signal(signum, frame):  # SIGTERM as Ctrl-C: stop the server, exit cleanly
        stop["signal"] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        err.print(f"kvq serve: starting llama-server: {resolved.name}, KV {policy.name}, {parallel} slots x {ctx} tokens",
                  style="dim", markup=False)
        server.start()
        typer.echo(f"{server.url}/v1")
        err.print(f"kvq serve: ready in {server.started_s:.1f} s (OpenAI API at {server.url}/v1; Ctrl-C stops)",
                  style="dim", markup=False)
        rc = server.proc.wait()
        raise ServerError(f"llama-server stopped on its own (exit {rc})")
    except KeyboardInterrupt:
        rc = server.stop()
        err.print(f"kvq serve: stopped (llama-server exit {rc})", style="dim", markup=False)
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
