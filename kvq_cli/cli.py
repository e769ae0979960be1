"""Thin Typer CLI: parse options, call the library stage, render. Heavy imports stay lazy."""
from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, Callable, Optional

import typer

from kvq_cli.controller import DAMAGE_FLOOR_PERCENTILE
from kvq_cli.errors import KvqError

app = typer.Typer(
    name="kvq",
    help="Adaptive per-token KV-cache quantization for small LLMs on-device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Shared options, defined once.
ModelArg = Annotated[Optional[str], typer.Argument(
    help="Registry alias (see `kvq models`), hub id, or path to a .gguf file. "
         "Default: smollm2-135m-instruct (embedded).", show_default=False)]
KvOpt = Annotated[str, typer.Option("--kv", help="KV cache policy: f16, q8, q4, q2 (kvq pools, static), rule, adaptive (the GGUF's controller, or the one kvq ships for the model), or stock llama.cpp caches stock-f16, stock-f16-fa (flash attention on), stock-q8_0, stock-q4_0, stock-q2_0. kvq policies take @BITS (adaptive@3.5).")]
KvBitsOpt = Annotated[Optional[float], typer.Option("--kv-bits", help="kvq memory budget in bits per KV element at full context (a full pool demotes, never overflows); adaptive also steers its choices to land on it.")]
KvCenterOpt = Annotated[str, typer.Option("--kv-center", help="kvq: subtract the controller's mean K per layer before storing K (attention is unchanged; quantized rows lose less): auto (rule/adaptive/oracle), on (every kvq policy) or off.")]
KvWindowOpt = Annotated[Optional[int], typer.Option("--kv-window", help="kvq: recent tokens kept at --kv-window-bits before a precision decision (default 0 for static; rule/adaptive: ctx/16 within 32-128, 32 with --kv-window-bits 16; oracle 32).")]
KvWindowBitsOpt = Annotated[Optional[int], typer.Option("--kv-window-bits", help="kvq: precision of the window rows, paid for in the budget: 16 (f16) or 8 (q8_0, 8.5 bits/element). Default 8 for rule/adaptive, 16 otherwise.")]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Context size in tokens (0 = the model's training context).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed (same seed, same output).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")]
OutTypeOpt = Annotated[str, typer.Option("--outtype", help="GGUF weight type: f16, q8_0 or q4_0.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


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


@app.command("models")
@handle_errors
def models_cmd(json_out: JsonFlag = False) -> None:
    """List the SmolLM/SmolLM2 registry with local status.

    Example: kvq models
    """
    import json

    from kvq_cli.hub import hub_cached_dir
    from kvq_cli.models import REGISTRY, local_gguf

    rows = []
    for spec in REGISTRY.values():
        gguf = local_gguf(spec)
        hub = None if gguf else hub_cached_dir(spec)
        status = ("embedded" if spec.embedded and gguf else "gguf" if gguf
                  else "checkpoint" if hub else "not downloaded")
        rows.append({"alias": spec.alias, "repo_id": spec.repo_id, "params": spec.params,
                     "instruct": spec.instruct, "status": status,
                     "path": str(gguf or hub) if (gguf or hub) else None})
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kvq models")
    for col in ("alias", "hub repo", "params", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["alias"], r["repo_id"], r["params"], r["status"])
    Console().print(table)


@app.command("pull")
@handle_errors
def pull_cmd(
    model: Annotated[str, typer.Argument(help="Registry alias or hub id, e.g. smollm2-360m-instruct.")],
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    outtype: OutTypeOpt = "f16",
) -> None:
    """Download a model's safetensors checkpoint from the hub (resumable) and convert it to GGUF.

    The GGUF lands in $KVQ_HOME/models (default ~/.cache/kvq/models), with the model's
    default controller embedded when kvq ships one.

    Example: kvq pull smollm2-360m-instruct
    """
    from kvq_cli.models import get_spec

    result = _fetch(get_spec(model), outtype=outtype, revision=revision)
    typer.echo(f"{result.alias}: {result.gguf}")
    if result.note:
        typer.echo(f"kvq: {result.note}", err=True)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = _stderr_console()
    # drawn only on a terminal: piped stderr keeps just the result and error lines
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)


def _tensor_progress(progress, what: str):
    task = progress.add_task(what, total=None)

    def on_tensor(name: str, i: int, n: int) -> None:
        progress.update(task, completed=i, total=n, description=f"{what} {name}")

    return on_tensor


def _fetch(spec, *, outtype: str = "f16", revision: str | None = None):
    """Download + convert with progress bars (used by `pull` and by `chat` for a missing model)."""
    from kvq_cli.convert import pull_and_convert

    with _progress() as progress:
        result, _ = pull_and_convert(spec, outtype=outtype, revision=revision, progress=progress,
                                     on_tensor=_tensor_progress(progress, "converting"))
    return result


@app.command("convert")
@handle_errors
def convert_cmd(
    src: Annotated[str, typer.Argument(help="HF checkpoint dir (config.json, *.safetensors, tokenizer.json), or a registry alias / hub id.")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output .gguf (default: $KVQ_HOME/models/ALIAS-OUTTYPE.gguf for an alias, ./DIR-OUTTYPE.gguf for a dir).")] = None,
    outtype: OutTypeOpt = "f16",
    controller: Annotated[Optional[str], typer.Option("--controller", help="Controller JSON to embed, or 'default' for the model's shipped one.")] = None,
) -> None:
    """Convert an HF SmolLM/SmolLM2 checkpoint to GGUF (atomic: no partial file on failure).

    Example: kvq convert ./SmolLM2-360M --out smollm2-360m.gguf --outtype q8_0
    """
    from pathlib import Path

    from kvq_cli.convert import convert, resolve_controller
    from kvq_cli.errors import ConversionError
    from kvq_cli.hub import pull
    from kvq_cli.models import converted_path, get_spec

    alias = None
    if Path(src).is_dir():
        model_dir = Path(src)
        default_out = Path(f"{model_dir.resolve().name}-{outtype}.gguf")
    elif Path(src).exists():
        raise ConversionError(f"{src} is a file; SRC must be a checkpoint directory or a model name")
    else:
        spec = get_spec(src)
        alias = spec.alias
        with _progress() as progress:
            pulled = pull(spec, progress=progress)
        if pulled.local_dir is None:
            raise ConversionError(f"{spec.alias} ships as GGUF ({pulled.gguf}); there is no checkpoint to convert")
        model_dir = pulled.local_dir
        default_out = converted_path(alias, outtype)
        default_out.parent.mkdir(parents=True, exist_ok=True)
    ctrl = resolve_controller(controller, alias)
    with _progress() as progress:
        result = convert(model_dir, out or default_out, outtype=outtype, controller=ctrl,
                         on_tensor=_tensor_progress(progress, "converting"))
    typer.echo(str(result.out))
    _stderr_console().print(
        f"{result.n_tensors} tensors, {result.n_params / 1e6:.1f}M params, {result.outtype}, "
        f"{result.size_bytes / 2**20:.1f} MiB" + (", controller embedded" if result.controller else ""),
        style="dim")


@app.command("embed")
@handle_errors
def embed_cmd(
    model: Annotated[str, typer.Argument(help="Input .gguf (left untouched).")],
    controller: Annotated[str, typer.Argument(help="Controller JSON file (from `kvq train`).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output .gguf (must differ from the input).")],
) -> None:
    """Copy a GGUF with a controller in its kvq.controller.* metadata (never edits in place).

    Example: kvq embed model.gguf controller.json --out model-kvq.gguf
    """
    from kvq_cli.controller import load_controller
    from kvq_cli.embed import embed

    ctrl = load_controller(controller)
    with _progress() as progress:
        task = progress.add_task("copying", total=None)
        result = embed(model, ctrl, out, on_tensor=lambda name: progress.advance(task))
    typer.echo(str(result.out))
    if result.replaced:
        _stderr_console().print("replaced the controller the input already had", style="dim")


@app.command("inspect")
@handle_errors
def inspect_cmd(
    file: Annotated[str, typer.Argument(help="Path to a .gguf file.")],
    json_out: JsonFlag = False,
) -> None:
    """Show a GGUF's architecture, dims, tensor types and metadata (incl. kvq.* keys).

    Example: kvq inspect model.gguf --json
    """
    import json

    from kvq_cli.gguf_info import inspect_gguf

    info = inspect_gguf(file)
    if json_out:
        typer.echo(json.dumps(info.to_json(), indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    out = Console()
    d = info.dims
    summary = Table(title=f"{info.path}", show_header=False)
    for k, v in [("architecture", info.architecture), ("name", info.name),
                 ("size", f"{info.size_bytes / 2**20:.1f} MiB"), ("gguf version", info.gguf_version),
                 ("layers", d.n_layer), ("embedding", d.n_embd),
                 ("heads / kv heads", f"{d.n_head} / {d.n_head_kv}"), ("head dim", d.head_dim),
                 ("train context", d.n_ctx_train), ("vocab", d.n_vocab),
                 ("KV elems / token", d.kv_elems_per_token),
                 ("tensors", f"{info.n_tensors} ({', '.join(f'{k}: {v}' for k, v in info.tensor_types.items())})"),
                 ("kvq controller", _controller_text(info.controller))]:
        summary.add_row(k, str(v))
    out.print(summary)
    meta = Table(title="metadata")
    meta.add_column("key")
    meta.add_column("value", overflow="fold")
    for k, v in {**info.metadata, **info.kvq}.items():
        text = str(v)
        meta.add_row(k, text if len(text) <= 120 else text[:117] + "...")
    out.print(meta)


def kvq_options(policies, kv_bits: float | None, kv_window: int | None, kv_center: str = "auto",
                kv_window_bits: int | None = None):
    """Validate --kv-bits/--kv-window/--kv-window-bits/--kv-center against the policies; the KvqOptions."""
    from kvq_cli.errors import BadOption
    from kvq_cli.runtime.kv import KvqOptions, check_budget

    if kv_center not in ("auto", "on", "off"):
        raise BadOption(f"--kv-center must be auto, on or off, got {kv_center}")
    if ((kv_bits is not None or kv_window is not None or kv_window_bits is not None or kv_center != "auto")
            and all(p.is_stock for p in policies)):
        raise BadOption("--kv-bits/--kv-window/--kv-window-bits/--kv-center apply to kvq policies, not "
                        + ", ".join(p.name for p in policies))
    if kv_bits is not None:
        check_budget(kv_bits)
    if kv_window is not None and kv_window < 0:
        raise BadOption(f"--kv-window must be >= 0, got {kv_window}")
    if kv_window_bits is not None and kv_window_bits not in (8, 16):
        raise BadOption(f"--kv-window-bits must be 16 or 8, got {kv_window_bits}")
    return KvqOptions(window=kv_window, budget_bits=kv_bits, k_center={"auto": None, "on": True, "off": False}[kv_center],
                      window_bits=kv_window_bits)


@app.command("bench")
@handle_errors
def bench_cmd(
    model: ModelArg = None,
    kv: Annotated[str, typer.Option("--kv", help="Comma-separated policies to compare (see `kvq chat --help`).")] = "stock-f16,f16,q8,q4",
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
    roofline: Annotated[bool, typer.Option("--roofline", help="Measure memory bandwidth; show bytes read per decoded token (weights + KV) and the bandwidth bound.")] = False,
    plot_path: Annotated[Optional[str], typer.Option("--plot", help="Draw decode tokens/s vs context per policy to this PNG (needs kvq-cli\\[plot]).")] = None,
    reuse_prefill: Annotated[bool, typer.Option("--reuse-prefill", help="Prefill once per policy and context; repeats roll the cache back and decode again (for slow-prefill caches; prefill speed is then one run).")] = False,
    threads: ThreadsOpt = None,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the records (a JSON list) to this file.")] = None,
) -> None:
    """Prefill and decode speed, KV bytes and bits/element for each policy and context.

    Example: kvq bench --kv stock-f16,stock-f16-fa,q4,rule --kv-bits 3 --ctx 512,2048,8192 --vs stock-f16,stock-f16-fa --roofline --json results/bench.json
    """
    import json

    from kvq_cli.bench import bench, load_text, plot, records_to_json
    from kvq_cli.errors import BadOption
    from kvq_cli.gguf_write import atomic_output, check_output
    from kvq_cli.models import gguf_for, resolve

    policies = parse_kv_list_checked(kv)
    try:
        ctxs = [int(c) for c in ctx.split(",") if c.strip()]
    except ValueError:
        raise BadOption(f"--ctx takes comma-separated integers, got '{ctx}'") from None
    if not ctxs or min(ctxs) < 2:
        raise BadOption("--ctx needs context lengths >= 2")
    baselines = [v.strip().lower() for v in vs.split(",") if v.strip()] if vs else None
    opts = kvq_options(policies, kv_bits, kv_window, kv_center, kv_window_bits)
    for out in (json_path, plot_path):
        if out:
            check_output(out)
    if plot_path:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise BadOption("--plot needs matplotlib", hint="pip install 'kvq-cli[plot]'")
    resolved = resolve(model)
    body, source = load_text(text, data)
    err = _stderr_console()
    with _progress() as progress:
        task = progress.add_task("bench", total=len(policies) * len(ctxs) * repeats)

        def on_run(name: str, c: int) -> None:
            progress.update(task, description=f"{name} @ {c} done", advance=1)

        records = bench(gguf_for(resolved, policies, opts), policies, ctxs, n_gen=gen, repeats=repeats, text=body, kvq=opts,
                        n_threads=threads, vs=baselines, roofline=roofline, reuse_prefill=reuse_prefill,
                        on_run=on_run)
    from rich.console import Console
    from rich.table import Table

    title = (f"kvq bench: {resolved.path.name}, text {source}, gen {gen}, median of {repeats}, "
             f"{records[0].threads} threads")
    if reuse_prefill:
        title += ", one prefill per policy"
    if roofline:
        title += f"; read bandwidth {records[0].bandwidth_gb_s:.1f} GB/s"
    table = Table(title=title)
    cols = ["kv", "ctx", "bits", "KV MiB", "prefill t/s", "decode t/s", "ms/tok", "attn ms", "policy %"]
    if baselines:
        cols += ["decode ×", "prefill ×"]
    if roofline:
        cols += ["MB/tok", "bound t/s", "% of bound"]
    for col in cols:
        table.add_column(col, justify="right" if col != "kv" else "left", no_wrap=True)
    for r in records:
        row = [r.kv, str(r.ctx), f"{r.bits_per_elem:.2f}", f"{r.kv_bytes / 2**20:.2f}", f"{r.prefill_tok_s:.1f}",
               f"{r.decode_tok_s:.2f}", f"{r.decode_ms_per_tok:.1f}", f"{r.attn_ms_per_tok:.1f}",
               f"{100 * r.policy_share:.1f}"]
        if baselines:
            row += [f"{r.decode_vs:.2f}", f"{r.prefill_vs:.2f}"]
        if roofline:
            row += [f"{r.bytes_per_token / 1e6:.0f}", f"{r.bound_tok_s:.1f}", f"{100 * r.bound_frac:.0f}"]
        table.add_row(*row)
    out_console = Console()
    if not out_console.is_terminal:
        out_console = Console(width=200)
    out_console.print(table)
    if baselines:
        out_console.print(f"ratios: against the fastest of {', '.join(baselines)} at each context, same run")
    if json_path:
        with atomic_output(json_path) as tmp:
            tmp.write_text(json.dumps(records_to_json(records), indent=2) + "\n")
        err.print(f"wrote {json_path}", style="dim")
    if plot_path:
        plot(records, plot_path, title)
        err.print(f"wrote {plot_path}", style="dim")


def _controller_text(c) -> str:
    if c is None:
        return "none"
    if "error" in c:
        return f"invalid: {c['error']}"
    return (f"v{c['version']}, features {', '.join(c['features'])}; precisions {c['precisions']} bits; "
            f"w1 {c['w1'][0]}x{c['w1'][1]}, w2 {c['w2'][0]}x{c['w2'][1]}; trained for {c['budget_bits']:g} bits, per {c.get('granularity', 'token').replace('_', ' and ')}")


def _ci(x, ci, pct: bool = True) -> str:
    """value±half-width of its 95% interval (the JSON keeps the exact bounds)."""
    if x is None:
        return "-"
    k, d = (100, 1) if pct else (1, 4)
    return f"{k * x:.{d}f}±{k * (ci[1] - ci[0]) / 2:.{d}f}" if ci else f"{k * x:.{d}f}"


@app.command("train")
@handle_errors
def train_cmd(
    model: ModelArg = None,
    calib: Annotated[str, typer.Option("--calib", help="Calibration text file (e.g. DATA/calib/boolq_passages.txt); never the evaluation sets.")] = ...,
    budget: Annotated[float, typer.Option("--budget", help="Bits per decided row at price 0, the controller's choice without --kv-bits (2.25 to 16; with --objective labels, the labels' average); at run time --kv-bits moves it to other budgets.")] = 3.5,
    out: Annotated[str, typer.Option("--out", "-o", help="Controller JSON to write (atomically).")] = ...,
    objective: Annotated[str, typer.Option("--objective", help="damage: regress each row's damage per precision and decide by damage + price * bits; log_damage: the same regression in log space (the runtime's log_damage head); labels: classify the oracle's labels at --budget.")] = "damage",
    granularity: Annotated[str, typer.Option("--granularity", help="token: one decision per token for all layers; token_layer: one per token and layer.")] = "token_layer",
    regime: Annotated[str, typer.Option("--regime", help="decode: chunks of --chunk-len decoded in 32-token ubatches behind the f16 window --window (chat, long text); prompt: short prompts (16-128 tokens) prefilled at once and decided with W = 0, damage from the next 16 tokens (multiple choice, `kvq eval --kv-window 0`); both: one controller for the two.")] = "both",
    chunks: Annotated[int, typer.Option("--chunks", help="Calibration chunks of the decode regime (the last 2 are held out for early stopping).")] = 12,
    prompts: Annotated[int, typer.Option("--prompts", help="Calibration prompts of the prompt regime (10% are held out).")] = 512,
    chunk_len: Annotated[int, typer.Option("--chunk-len", help="Tokens per calibration chunk (regime decode).")] = 1024,
    window: Annotated[int, typer.Option("--window", help="The f16 window W the controller is trained for (regime decode; features see W later queries).")] = 32,
    hidden: Annotated[int, typer.Option("--hidden", help="Hidden units of the MLP.")] = 16,
    epochs: Annotated[int, typer.Option("--epochs", help="Maximum epochs (early stopping on the held-out chunks).")] = 60,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation and batching (same seed, same controller).")] = 0,
    ensemble: Annotated[int, typer.Option("--ensemble", help="Fit N regressors (seeds SEED..SEED+N-1) and ship their mean as one MLP of N x --hidden units (damage objectives).")] = 1,
    cache: Annotated[Optional[str], typer.Option("--cache", help="NPZ of collected features and damage: read if it exists, else written (reuse across budgets); with --regime both, NAME.decode.npz and NAME.prompt.npz next to it.")] = None,
    embed_out: Annotated[Optional[str], typer.Option("--embed", help="Also write a copy of the GGUF with the controller embedded here.")] = None,
    k_center: Annotated[bool, typer.Option("--k-center/--no-k-center", help="Center K by its mean per layer on the calibration text (saved with the controller; attention is unchanged, quantized rows lose less).")] = True,
    pools: Annotated[str, typer.Option("--pools", help="The controller's output classes, in bits: 2,4,8,16; 2,3,4,8,16 with the k4v2 pool (K at 4 bits, V at 2; 3.375 bits/element); or 0,2,4,8,16 with eviction (0: the row is left out).")] = "2,4,8,16",
    layer_weights: Annotated[int, typer.Option("--layer-weights", help="Measure how much KL a unit of damage costs in each layer on N chunks of --chunk-len tokens of the calibration text (N x (layers + 1) decodes) and ship its square root as the controller's layer weights (token_layer only); 0: every layer weighs 1.")] = 0,
    damage_rounding: Annotated[str, typer.Option("--damage-rounding", help="How the damage targets round K at 2 and 4 bits: plain, or qar (query-aware, from the queries that attend to each row in the window, as the runtime stores it). The shipped controller uses plain: qar decoded wikitext-2 worse (README).")] = "plain",
    damage_v_scales: Annotated[str, typer.Option("--damage-v-scales", help="How the damage targets store V at 2 and 4 bits: least-squares block scales, or unbiased (each block's projection on the original kept exact, as the runtime stores V rows of rule/adaptive caches).")] = "least-squares",
    v_weight: Annotated[float, typer.Option("--v-weight", help="Weight of the V errors in the damage targets (they enter scaled by its square root); 1: the first-order damage as measured. The shipped controller uses the default: the first-order damage undervalues V errors (README).")] = 10.0,
    damage_floor_pct: Annotated[float, typer.Option("--damage-floor", help="Damage objectives: the percentile (of the training rows) of each ratio of a row's damage at one precision to its damage at the next one; the controller projects its estimates onto them before deciding, so a row never looks cheaper at fewer bits than the calibration rows allow. 0: no projection.")] = DAMAGE_FLOOR_PERCENTILE,
    threads: ThreadsOpt = None,
) -> None:
    """Learn a precision controller from the runtime's oracle on calibration text.

    Example: kvq train --calib ../shared/data/calib/boolq_passages.txt --budget 3.5 --out ctrl.json --embed m-kvq.gguf
    """
    import json
    import math
    from pathlib import Path

    from kvq_cli.controller import GRANULARITIES
    from kvq_cli.embed import embed
    from kvq_cli.errors import BadOption, OutputError
    from kvq_cli.gguf_write import atomic_output, check_output
    from kvq_cli.models import resolve
    from kvq_cli.train import OBJECTIVES, POOL_SETS, REGIMES, calibration_data, check_ensemble, layer_sensitivity, train

    if granularity not in GRANULARITIES:
        raise BadOption(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity}")
    if not (2.25 <= budget <= 16):
        raise BadOption(f"--budget must be between 2.25 and 16 bits, got {budget:g}")
    if objective not in OBJECTIVES:
        raise BadOption(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective}")
    if regime not in REGIMES:
        raise BadOption(f"--regime must be one of {', '.join(REGIMES)}, got {regime}")
    if pools.replace(" ", "") not in POOL_SETS:
        raise BadOption(f"--pools must be one of {', '.join(POOL_SETS)}, got {pools}")
    check_ensemble(ensemble, objective)
    if damage_rounding not in ("plain", "qar"):
        raise BadOption(f"--damage-rounding must be plain or qar, got {damage_rounding}")
    if damage_v_scales not in ("least-squares", "unbiased"):
        raise BadOption(f"--damage-v-scales must be least-squares or unbiased, got {damage_v_scales}")
    if not (v_weight > 0 and math.isfinite(v_weight)):
        raise BadOption(f"--v-weight must be a positive number, got {v_weight:g}")
    if chunks < 3 or prompts < 20 or chunk_len < 4 * window + 64 or window < 1:
        raise BadOption("need --chunks >= 3, --prompts >= 20, --window >= 1 and --chunk-len >= 4 * window + 64")
    if layer_weights < 0 or (layer_weights and granularity != "token_layer"):
        raise BadOption(f"--layer-weights needs a count >= 0 and --granularity token_layer, got {layer_weights}")
    if not Path(calib).is_file():
        raise BadOption(f"--calib {calib}: no such file")
    for o in (out, embed_out):
        if o:
            check_output(o)
    resolved = resolve(model)
    with _progress() as progress:
        task = progress.add_task("oracle over calibration text", total=chunks)
        data, n_held = calibration_data(resolved.path, Path(calib).read_text(encoding="utf-8", errors="replace"),
                                        regime=regime, cache=Path(cache) if cache else None, n_chunks=chunks,
                                        n_prompts=prompts, chunk_len=chunk_len, window=window, n_threads=threads,
                                        on_chunk=lambda i, n: progress.update(task, completed=i, total=n),
                                        k_center=k_center, precisions=POOL_SETS[pools.replace(" ", "")],
                                        qar=damage_rounding == "qar", v_weight=v_weight,
                                        v_unbias=damage_v_scales == "unbiased")
        fit_task = progress.add_task("fit", total=epochs)
        spec, report = train(data, budget=budget, per_layer=granularity == "token_layer", hidden=hidden,
                             seed=seed, epochs=epochs, val_chunks=n_held, objective=objective, ensemble=ensemble,
                             floor_percentile=damage_floor_pct, on_epoch=lambda e, n, loss: progress.update(
                                 fit_task, completed=e, description=f"fit (held-out loss {loss:.3f})"))
        if layer_weights:
            sens_task = progress.add_task("layer sensitivity", total=1)
            ls = layer_sensitivity(resolved.path, Path(calib).read_text(encoding="utf-8", errors="replace"),
                                   k_center=spec.k_center, n_chunks=layer_weights, chunk_len=chunk_len,
                                   n_threads=threads, on_layer=lambda i, n: progress.update(sens_task, completed=i, total=n))
            spec.layer_weight = ls.weight().tolist()
            spec.validate()
    spec.extra.update({"calib": Path(calib).name, "regime": regime,
                       **({"damage_rounding": damage_rounding} if damage_rounding != "plain" else {}),
                       **({"damage_v_scales": damage_v_scales} if damage_v_scales != "least-squares" else {}),
                       "v_weight": v_weight,
                       **({"layer_weights": {"chunks": layer_weights, "layer_kl": ls.kl.tolist(), "layer_damage": ls.damage.tolist()}} if layer_weights else {}),
                       **({} if regime == "prompt" else {"chunks": chunks, "chunk_len": chunk_len, "window": window}),
                       **({} if regime == "decode" else {"prompts": prompts}),
                       "model": resolved.path.name, "report": {k: v for k, v in vars(report).items()}})
    try:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e}") from None
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kvq train: {granularity}, {regime} regime, {objective} objective at {budget:g} bits/row, {report.n_train} rows "
                    f"(+{report.n_val} held out), {report.epochs} epochs", show_header=True)
    t.add_column("held out")
    t.add_column("value", justify="right")
    for name, value in (("agreement with oracle labels", f"{100 * report.val_acc:.1f}%"),
                        ("bits/row: labels / controller", f"{report.label_bits:.2f} / {report.val_bits:.2f}"),
                        ("damage: oracle (labels)", f"{report.oracle_damage:.3g}"),
                        ("damage: oracle, controller's bits", f"{report.oracle_damage_same_bits:.3g}"),
                        ("damage: controller", f"{report.val_damage:.3g}"),
                        ("damage: static mix, same bits", f"{report.static_damage:.3g}")):
        t.add_row(name, value)
    Console().print(t)
    imp = Table(title=f"feature importance ({report.importance_metric})")
    imp.add_column("feature")
    imp.add_column("Δ CE" if objective == "labels" else "Δ damage", justify="right")
    for name, v in sorted(report.importance.items(), key=lambda kv: -kv[1]):
        imp.add_row(name, f"{v:+.3f}")
    Console().print(imp)
    typer.echo(f"controller: {out}")
    if embed_out:
        embed(resolved.path, spec, embed_out)
        typer.echo(f"embedded: {embed_out}")


@app.command("eval")
@handle_errors
def eval_cmd(
    model: ModelArg = None,
    task: Annotated[str, typer.Option("--task", help="Comma-separated tasks: hellaswag, arc-easy, arc-challenge, openbookqa, wikitext2 (or all).")] = "all",
    kv: Annotated[str, typer.Option("--kv", help="Comma-separated policies scored side by side on the same items.")] = "stock-f16,f16,q8,q4,q2",
    kv_bits: KvBitsOpt = None,
    kv_window: KvWindowOpt = None,
    kv_window_bits: KvWindowBitsOpt = None,
    kv_center: KvCenterOpt = "auto",
    data: Annotated[Optional[str], typer.Option("--data", envvar="KVQ_DATA", help="Evaluation data dir (hellaswag/, arc/, openbookqa/, wikitext2/; see its SOURCES.md). Env: KVQ_DATA.")] = None,
    split: Annotated[str, typer.Option("--split", help="test, or dev (ARC and OpenBookQA) for tuning.")] = "test",
    limit: Annotated[Optional[str], typer.Option("--limit", help="Score only the first N items of each multiple-choice task, or per task: hellaswag=2000,arc-easy=500.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="wikitext2: token budget (the first N tokens, whole chunks).")] = 32768,
    ppl_ctx: Annotated[int, typer.Option("--ppl-ctx", help="wikitext2: chunk length; the second half of each chunk is scored.")] = 512,
    ctx: Annotated[int, typer.Option("--ctx", help="Context of the multiple-choice runs (longer items are left-truncated).")] = 1024,
    ref: Annotated[str, typer.Option("--ref", help="Policy that paired differences and KL compare against ('none' to skip).")] = "f16",
    mc_kl: Annotated[bool, typer.Option("--mc-kl/--no-mc-kl", help="Multiple choice: KL vs --ref on every choice token (re-scores the reference for items it has from an earlier run).")] = True,
    ending_ubatch: Annotated[Optional[int], typer.Option("--ending-ubatch", help="Multiple choice: decode each ending N tokens per ubatch (1: as in generation, where rule/adaptive decide each row before the next token). Default: the whole ending in one ubatch, its own rows f16 until it ends.")] = None,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the records (a JSON list, resumable) to this file; rewritten at checkpoints.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the records in --json (items already scored are kept).")] = False,
    threads: ThreadsOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
) -> None:
    """Accuracy (acc, acc_norm), wikitext-2 perplexity and KL of KV policies, side by side.

    Example: kvq eval --data ../shared/data --task hellaswag,wikitext2 --kv f16,q4,q2 --limit 200 --json eval.json
    """
    import json
    from pathlib import Path

    from kvq_cli.errors import BadOption, OutputError
    from kvq_cli.evaluate import EvalConfig, EvalRun, eval_records_to_json
    from kvq_cli.gguf_write import atomic_output
    from kvq_cli.models import gguf_for, resolve
    from kvq_cli.runtime.kv import parse_kv
    from kvq_cli.tasks import parse_tasks

    policies = parse_kv_list_checked(kv, eval_only_ok=True)
    ref_name = None if ref.lower() == "none" else ref.strip().lower()
    added_ref = ref_name is not None and ref_name not in [p.name for p in policies]
    if added_ref:
        policies.insert(0, parse_kv(ref_name))  # paired differences need the reference on the same items
    tasks = parse_tasks(task)
    if data is None:
        raise BadOption("no evaluation data", hint="pass --data DIR (or set KVQ_DATA)")
    if not Path(data).is_dir():
        raise BadOption(f"--data {data} is not a directory")
    limits = _parse_limit(limit, tasks)
    if tokens < ppl_ctx:
        raise BadOption(f"--tokens ({tokens}) must be at least one chunk (--ppl-ctx {ppl_ctx})")
    if resume and not json_path:
        raise BadOption("--resume needs --json PATH (the file to continue)")
    if ending_ubatch is not None and ending_ubatch < 1:
        raise BadOption(f"--ending-ubatch must be >= 1, got {ending_ubatch}")
    opts = kvq_options(policies, kv_bits, kv_window, kv_center, kv_window_bits)
    previous = None
    err = _stderr_console()
    if resume and Path(json_path).exists():
        try:
            previous = json.loads(Path(json_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadOption(f"--resume: cannot read {json_path} ({e})") from None
        if not isinstance(previous, list):
            raise BadOption(f"--resume: {json_path} is not a list of kvq eval records")
    resolved = resolve(model)
    cfg = EvalConfig(model=gguf_for(resolved, policies, opts), policies=tuple(policies), tasks=tuple(tasks), data=Path(data),
                     split=split, limit=limits, n_ctx=ctx, ppl_ctx=ppl_ctx, ppl_tokens=tokens, kvq=opts,
                     ref=ref_name, mc_kl=mc_kl, n_threads=threads, seed=seed, ending_ubatch=ending_ubatch)
    run = EvalRun(cfg, previous)
    if added_ref:   # after every check of the options, so that bad input gets one line
        err.print(f"kvq: also running the reference policy {ref_name} (--ref none to skip)", style="dim")

    def write(records) -> None:
        if json_path:
            try:
                with atomic_output(json_path) as tmp:
                    tmp.write_text(json.dumps(eval_records_to_json(records), indent=1) + "\n")
            except OSError as e:
                raise OutputError(f"cannot write {json_path}: {e}") from None

    run.on_checkpoint = write
    with _progress() as progress:
        bars: dict[str, Any] = {}

        def on_progress(name: str, i: int, n: int) -> None:
            if name not in bars:
                bars[name] = progress.add_task(f"{name} x {len(policies)} policies", total=n)
            progress.update(bars[name], completed=i, total=n)

        try:
            records = run.run(on_progress)
        except KeyboardInterrupt:
            write(run.all_records())  # scored items are kept for --resume, other records too
            raise
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvq eval: {resolved.path.name}, split {split}; intervals: bootstrap 95%, Δ vs {cfg.ref or '-'} paired")
    for col in ("task", "kv", "n", "bits", "acc %", "acc_norm %", "Δacc pt", "Δacc_norm pt", "ppl", "KL"):
        table.add_column(col, justify="left" if col in ("task", "kv") else "right")
    for r in records:
        table.add_row(r.task, r.kv, str(r.n), f"{r.bits_per_elem:.2f}" if r.bits_per_elem is not None else "-",
                      _ci(r.acc, r.acc_ci95), _ci(r.acc_norm, r.acc_norm_ci95),
                      _ci(r.diff_acc, r.diff_acc_ci95), _ci(r.diff_acc_norm, r.diff_acc_norm_ci95),
                      f"{r.ppl:.3f}" if r.ppl is not None else "-", _ci(r.kl, r.kl_ci95, pct=False))
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    out.print(table)
    if json_path:
        err.print(f"wrote {json_path}", style="dim")


def _parse_limit(value: str | None, tasks: list[str]):
    """--limit N (every multiple-choice task) or task=N,task=N."""
    from kvq_cli.errors import BadOption

    if value is None:
        return None
    try:
        if "=" not in value:
            n = int(value)
            out: int | dict[str, int] = n
            ns = [n]
        else:
            out = {k.strip().lower(): int(v) for k, v in (kv.split("=", 1) for kv in value.split(",") if kv.strip())}
            ns = list(out.values())
            unknown = [k for k in out if k not in tasks]
            if unknown:
                raise BadOption(f"--limit names tasks not in --task: {', '.join(unknown)}")
    except ValueError:
        raise BadOption(f"--limit takes N or task=N,task=N; got '{value}'") from None
    if min(ns) < 1:
        raise BadOption(f"--limit must be >= 1, got '{value}'")
    return out


def parse_kv_list_checked(kv: str, *, eval_only_ok: bool = False):
    """--kv list with duplicates refused (records are keyed by policy name)."""
    from kvq_cli.errors import BadOption
    from kvq_cli.runtime.kv import parse_kv_list, require_online

    policies = parse_kv_list(kv)
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise BadOption(f"--kv lists a policy twice: {kv}")
    if not eval_only_ok:
        require_online(policies)
    return policies


@app.command("chat")
@handle_errors
def chat_cmd(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One-shot: print the reply to this prompt and exit.")] = None,
    kv: KvOpt = "stock-f16",
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
) -> None:
    """Chat with a model (streaming, multi-turn; /exit quits, /reset forgets).

    Example: kvq chat --prompt "Name three colours." --seed 1
    """
    from kvq_cli.chat import ChatSession
    from kvq_cli.config import GenerationConfig
    from kvq_cli.errors import BadOption, ModelNotDownloaded
    from kvq_cli.models import get_spec, gguf_for, resolve
    from kvq_cli.runtime.engine import Engine
    from kvq_cli.runtime.kv import parse_kv, require_online

    policy = parse_kv(kv)
    require_online([policy])
    opts = kvq_options([policy], kv_bits, kv_window, kv_center, kv_window_bits)
    if ctx < 0:
        raise BadOption(f"--ctx must be >= 0, got {ctx}")
    if max_tokens <= 0:
        raise BadOption(f"--max-tokens must be > 0, got {max_tokens}")
    try:
        resolved = resolve(model)
    except ModelNotDownloaded as e:
        spec = get_spec(model) if model else None
        if spec is None or spec.embedded:
            raise
        _stderr_console().print(f"{e}: pulling it now", style="dim")
        _fetch(spec)
        resolved = resolve(model)
    err = _stderr_console()
    gen = GenerationConfig(max_tokens=max_tokens, temperature=temperature, seed=seed)
    with Engine(gguf_for(resolved, [policy], opts), kv=policy, n_ctx=ctx, seed=seed, n_threads=threads, kvq=opts) as engine:
        session = ChatSession(engine, gen, system=system)
        if prompt is not None:
            for piece in session.reply(prompt):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            err.print(engine.kv_stats().summary(), style="dim", markup=False)
            return
        _interactive(session, resolved.name, err)


def _interactive(session, name: str, err) -> None:
    from rich.console import Console

    out = Console(highlight=False)
    err.print(f"kvq chat: {name}, KV {session.engine.kv.name}, ctx {session.engine.n_ctx}. "
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
        dropped = session.dropped_turns
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
        if session.dropped_turns > dropped:
            err.print("(context full: oldest turns dropped)", style="dim")
        err.print(session.engine.kv_stats().summary(), style="dim", markup=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
