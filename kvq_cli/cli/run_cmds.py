"""Commands that run a model: chat and bench."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvq_cli.cli.options import (CtxOpt, KvBitsOpt, KvCenterOpt, KvOpt, KvWindowBitsOpt, KvWindowOpt, ModelArg,
                                 SeedOpt, ThreadsOpt, progress, stderr_console)
from kvq_cli.errors import KvqError
from kvq_cli.runtime.kv import DEFAULT_KV


def chat_cmd(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One-shot: print the reply to this prompt and exit.")] = None,
    kv: KvOpt = None,
    kv_bits: KvBitsOpt = None,
    kv_window: KvWindowOpt = None,
    kv_window_bits: KvWindowBitsOpt = None,
    kv_center: KvCenterOpt = "auto",
    ctx: CtxOpt = 2048,
    seed: SeedOpt = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Maximum tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option("--temp", help="Sampling temperature (0 = greedy).")] = 0.7,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
    threads: ThreadsOpt = None,
    session_file: Annotated[Optional[Path], typer.Option(
        "--session", help="Session file: the conversation (its KV cache) is restored from it when it exists and "
                          "saved to it after every reply; it needs the same model, --kv and --ctx.")] = None,
) -> None:
    """Chat with a model (streaming, multi-turn; /exit quits, /reset forgets).

    A full context shifts: the oldest half of the conversation after the system prompt goes, and the chat goes on.

    Example: kvq chat --prompt "Name three colours." --seed 1
    """
    from kvq_cli.config import GenerationConfig
    from kvq_cli.errors import BadOption
    from kvq_cli.models.registry import model_ref
    from kvq_cli.runtime.chat import ChatSession
    from kvq_cli.runtime.engine import Engine
    from kvq_cli.runtime.kv import default_kv, kvq_options, parse_kv_list

    policies = parse_kv_list(default_kv(kv, kv_bits))
    if len(policies) != 1:
        raise BadOption(f"chat takes one --kv policy, got {kv}")
    policy = policies[0]
    opts = kvq_options([policy], kv_bits, kv_window, kv_center, kv_window_bits)
    if ctx < 0:
        raise BadOption(f"--ctx must be >= 0, got {ctx}")
    gen = GenerationConfig(max_tokens=max_tokens, temperature=temperature, seed=seed)
    if session_file is not None:
        from kvq_cli.gguf.write import check_output

        check_output(session_file)   # before the model loads, not after the first reply
    err = stderr_console()
    resolved = resolve_or_pull(model, err)
    with Engine(model_ref(resolved, [policy], opts), kv=policy, n_ctx=ctx, seed=seed, n_threads=threads, kvq=opts) as engine:
        note_generic(engine.model, err)
        session = ChatSession(engine, gen, system=system)
        try:
            if session_file is not None and session_file.exists():
                n = session.restore(session_file)
                err.print(f"kvq: session {session_file} restored ({n} tokens)", style="dim", markup=False)
            if prompt is not None:
                for piece in session.reply(prompt):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                if session_file is not None:
                    session.save(session_file)
                err.print(engine.kv_stats().summary(engine.kv.name), style="dim", markup=False)
                return
            _interactive(session, resolved.name, err, session_file)
        finally:
            session.close()


def resolve_or_pull(model: str | None, err):
    """The model to run (models.registry.resolve); a registry model not downloaded yet is pulled first."""
    from kvq_cli.cli.model_cmds import fetch
    from kvq_cli.errors import ModelNotDownloaded
    from kvq_cli.models.registry import get_spec, resolve

    try:
        return resolve(model)
    except ModelNotDownloaded as e:
        spec = get_spec(model) if model else None
        if spec is None or spec.embedded:
            raise
        err.print(f"{e}: pulling it now", style="dim")
        fetch(spec)
        return resolve(model)


def note_generic(ref, err) -> None:
    """One line when adaptive runs the generic controller (ref: runtime.engine.ModelRef): how to get one
    for this model."""
    if ref.source == "generic":
        err.print(f"kvq: {ref.path.name} has no controller of its own: adaptive runs the generic one; "
                  f"`kvq calibrate {ref.path}` learns one for this model", style="dim", markup=False)


def _interactive(session, name: str, err, session_file=None) -> None:
    from rich.console import Console

    out = Console(highlight=False)
    err.print(f"kvq chat: {name}, KV {session.engine.kv_label}, ctx {session.engine.n_ctx}. "
              "/exit to quit, /reset to forget, Ctrl-C stops a reply.", style="dim")
    while True:
        try:
            line = out.input("[bold green]>>> [/]")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            session.reset()
            err.print("(conversation forgotten)", style="dim")
            continue
        dropped, shifts = session.dropped_turns, session.n_shifts
        try:
            for piece in session.reply(text):
                out.print(piece, end="", markup=False, highlight=False)
        except KeyboardInterrupt:
            out.print(" [interrupted]", style="dim", end="")
        except KvqError as e:
            out.print()
            err.print(f"kvq: {e.one_line()}", style="red")
            continue
        out.print()
        if session_file is not None:
            session.save(session_file)
        if session.n_shifts > shifts:
            err.print("(context full: shifted, the oldest half of the conversation dropped)", style="dim")
        elif session.dropped_turns > dropped:
            err.print("(context full: oldest turns dropped)", style="dim")
        err.print(session.engine.kv_stats().summary(session.engine.kv.name), style="dim", markup=False)


def bench_cmd(
    model: ModelArg = None,
    kv: Annotated[str, typer.Option("--kv", help="Comma-separated policies to compare (see `kvq chat --help`).")] = f"stock-f16,{DEFAULT_KV}",
    ctx: Annotated[str, typer.Option("--ctx", help="Comma-separated context lengths; each prefills ctx-gen tokens.")] = "512,2048",
    gen: Annotated[int, typer.Option("--gen", help="Tokens to decode after the prefill.")] = 32,
    repeats: Annotated[int, typer.Option("--repeats", help="Interleaved repeats per policy; records keep the median.")] = 3,
    kv_bits: KvBitsOpt = None,
    kv_window: KvWindowOpt = None,
    kv_window_bits: KvWindowBitsOpt = None,
    kv_center: KvCenterOpt = "auto",
    text: Annotated[Optional[str], typer.Option("--text", help="Text file to prefill (default: wikitext-2 from --data, else Python's stdlib docstrings).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Evaluation data dir (uses wikitext2/wiki.test.nonempty-lf.raw).")] = None,
    vs: Annotated[Optional[str], typer.Option("--vs", help="Baseline policies (comma-separated, among --kv): print speed ratios against the fastest of them at each context.")] = None,
    roofline: Annotated[bool, typer.Option("--roofline", help="Measure memory bandwidth; show bytes read per decoded token (weights + KV), the bandwidth bound, and kvq's attention time over its own bound (KV bytes held / bandwidth).")] = False,
    plot_path: Annotated[Optional[str], typer.Option("--plot", help="Draw decode tokens/s vs context per policy to this PNG (needs kvq-cli\\[plot]).")] = None,
    reuse_prefill: Annotated[bool, typer.Option("--reuse-prefill", help="Prefill once per policy and context; repeats roll the cache back and decode again (for slow-prefill caches; prefill speed is then one run).")] = False,
    threads: ThreadsOpt = None,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the records (a JSON list) to this file.")] = None,
) -> None:
    """Prefill and decode speed, KV bytes and bits/element for each policy and context.

    Example: kvq bench --kv stock-f16,stock-f16-fa,q4,rule --kv-bits 3 --ctx 512,2048,8192 --vs stock-f16,stock-f16-fa --roofline --json results/bench.json
    """
    import json

    from kvq_cli.cli.render import bench_table
    from kvq_cli.eval.bench import bench, check_plot, load_text, parse_ctxs, plot, records_to_json
    from kvq_cli.gguf.write import atomic_output, check_output
    from kvq_cli.models.registry import model_ref, resolve
    from kvq_cli.runtime.kv import kvq_options, parse_kv_list

    policies = parse_kv_list(kv)
    ctxs = parse_ctxs(ctx)
    baselines = [v.strip().lower() for v in vs.split(",") if v.strip()] if vs else None
    opts = kvq_options(policies, kv_bits, kv_window, kv_center, kv_window_bits)
    for out in (json_path, plot_path):
        if out:
            check_output(out)
    check_plot(plot_path)
    resolved = resolve(model)
    body, source = load_text(text, data)
    ref = model_ref(resolved, policies, opts)
    note_generic(ref, stderr_console())
    with progress() as bar:
        task = bar.add_task("bench", total=len(policies) * len(ctxs) * repeats)
        records = bench(ref, policies, ctxs, n_gen=gen, repeats=repeats, text=body,
                        kvq=opts, n_threads=threads, vs=baselines, roofline=roofline, reuse_prefill=reuse_prefill,
                        on_run=lambda name, c: bar.update(task, description=f"{name} @ {c} done", advance=1))
    title = (f"kvq bench: {resolved.path.name}, text {source}, gen {gen}, median of {repeats}, "
             f"{records[0].threads} threads; {records[0].cpu} ({records[0].simd})")
    if reuse_prefill:
        title += ", one prefill per policy"
    if roofline:
        title += f"; read bandwidth {records[0].bandwidth_gb_s:.1f} GB/s"
    bench_table(records, title, baselines=baselines, roofline=roofline)
    err = stderr_console()
    if json_path:
        with atomic_output(json_path) as tmp:
            tmp.write_text(json.dumps(records_to_json(records), indent=2) + "\n")
        err.print(f"wrote {json_path}", style="dim")
    if plot_path:
        plot(records, plot_path, title)
        err.print(f"wrote {plot_path}", style="dim")
