"""Model commands: models, pull, convert, embed, inspect."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from kvq_cli.cli.options import (CalibTokensOpt, JsonFlag, NoCalibrateOpt, OutTypeOpt, progress, stderr_console,
                                 tensor_progress)


def models_cmd(json_out: JsonFlag = False) -> None:
    """List the SmolLM/SmolLM2 registry with local status.

    Example: kvq models
    """
    import json

    from kvq_cli.cli.render import models_table
    from kvq_cli.models.hub import hub_cached_dir
    from kvq_cli.models.registry import REGISTRY, local_gguf

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
    else:
        models_table(rows)


def fetch(spec, *, outtype: str = "f16", revision: str | None = None, calibrate: bool = False,
          calib_tokens: int | None = None):
    """Download + convert with progress bars (`pull`, and `chat` for a missing model); with `calibrate`,
    a model kvq ships no controller for gets one calibrated into its GGUF."""
    from kvq_cli.models.convert import pull_and_convert
    from kvq_cli.train.calibrate import sized_config

    cfg = sized_config(calib_tokens)   # a bad --calib-tokens fails before the download
    with progress() as bar:
        result, conv = pull_and_convert(spec, outtype=outtype, revision=revision, progress=bar,
                                        on_tensor=tensor_progress(bar, "converting"))
    if calibrate and conv is not None and not conv.controller:
        from kvq_cli.cli.eval_cmds import calibrate_with_progress

        calibrate_with_progress(result.gguf, None, cfg)
    return result


def pull_cmd(
    model: Annotated[str, typer.Argument(help="Registry alias or hub id, e.g. smollm2-360m-instruct.")],
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    outtype: OutTypeOpt = "f16",
    no_calibrate: NoCalibrateOpt = False,
    calib_tokens: CalibTokensOpt = None,
) -> None:
    """Download a model's safetensors checkpoint from the hub (resumable) and convert it to GGUF.

    The GGUF lands in $KVQ_HOME/models (default ~/.cache/kvq/models) with a controller embedded:
    the one kvq ships for the model, else one calibrated for it (`kvq calibrate`; --no-calibrate skips it).

    Example: kvq pull smollm2-360m-instruct
    """
    from kvq_cli.models.registry import get_spec

    result = fetch(get_spec(model), outtype=outtype, revision=revision, calibrate=not no_calibrate,
                   calib_tokens=calib_tokens)
    typer.echo(f"{result.alias}: {result.gguf}")
    if result.note:
        typer.echo(f"kvq: {result.note}", err=True)


def convert_cmd(
    src: Annotated[str, typer.Argument(help="HF checkpoint dir (config.json, *.safetensors, tokenizer.json), or a registry alias / hub id.")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output .gguf (default: $KVQ_HOME/models/ALIAS-OUTTYPE.gguf for an alias, ./DIR-OUTTYPE.gguf for a dir).")] = None,
    outtype: OutTypeOpt = "f16",
    controller: Annotated[Optional[str], typer.Option("--controller", help="Controller JSON to embed, or 'default' for the model's shipped one. Default: the shipped one, else one calibrated for the model.")] = None,
    no_calibrate: NoCalibrateOpt = False,
    calib_tokens: CalibTokensOpt = None,
) -> None:
    """Convert an HF SmolLM/SmolLM2 checkpoint to GGUF (atomic: no partial file on failure).

    The GGUF gets a controller: --controller, else the one kvq ships for the model, else one
    calibrated for it (`kvq calibrate`; --no-calibrate skips it).

    Example: kvq convert ./SmolLM2-360M --out smollm2-360m.gguf --outtype q8_0
    """
    from kvq_cli.controller.catalog import shipped_path
    from kvq_cli.gguf.write import check_output
    from kvq_cli.models.convert import convert, model_dir_for, resolve_controller
    from kvq_cli.train.calibrate import sized_config

    cfg = sized_config(calib_tokens)
    if out:
        check_output(out)
    with progress() as bar:
        model_dir, default_out, alias = model_dir_for(src, outtype, progress=bar)
    if controller is None and shipped_path(alias) is not None:
        controller = "default"
    ctrl = resolve_controller(controller, alias)
    with progress() as bar:
        result = convert(model_dir, out or default_out, outtype=outtype, controller=ctrl,
                         on_tensor=tensor_progress(bar, "converting"))
    stderr_console().print(
        f"{result.n_tensors} tensors, {result.n_params / 1e6:.1f}M params, {result.outtype}, "
        f"{result.size_bytes / 2**20:.1f} MiB" + (", controller embedded" if result.controller else ""),
        style="dim")
    if ctrl is None and not no_calibrate:
        from kvq_cli.cli.eval_cmds import calibrate_with_progress

        calibrate_with_progress(result.out, None, cfg)
    typer.echo(str(result.out))


def embed_cmd(
    model: Annotated[str, typer.Argument(help="Input .gguf (left untouched).")],
    controller: Annotated[str, typer.Argument(help="Controller JSON file (from `kvq train`).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output .gguf (must differ from the input).")],
) -> None:
    """Copy a GGUF with a controller in its kvq.controller.* metadata (never edits in place).

    Example: kvq embed model.gguf controller.json --out model-kvq.gguf
    """
    from kvq_cli.controller.embed import embed
    from kvq_cli.controller.spec import load_controller

    ctrl = load_controller(controller)
    with progress() as bar:
        task = bar.add_task("copying", total=None)
        result = embed(model, ctrl, out, on_tensor=lambda name: bar.advance(task))
    typer.echo(str(result.out))
    if result.replaced:
        stderr_console().print("replaced the controller the input already had", style="dim")


def inspect_cmd(
    file: Annotated[str, typer.Argument(help="Path to a .gguf file.")],
    json_out: JsonFlag = False,
) -> None:
    """Show a GGUF's architecture, dims, tensor types and metadata (incl. kvq.* keys).

    Example: kvq inspect model.gguf --json
    """
    import json

    from kvq_cli.cli.render import inspect_tables
    from kvq_cli.models.inspect import inspect_gguf

    info = inspect_gguf(file)
    if json_out:
        typer.echo(json.dumps(info.to_json(), indent=2, default=str))
    else:
        inspect_tables(info)
