"""`kvq calibrate`: a controller for a model, learned from the calibration text kvq ships, embedded in its GGUF.

The same pipeline as `kvq train` (train.pipeline) with its defaults, on `data/calibration.txt`
(data/README.md: source and licence), sized by the number of calibration tokens it reads.
`kvq pull` and `kvq convert` run it for models kvq ships no controller for.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from kvq_cli.controller.spec import ControllerSpec
from kvq_cli.errors import BadOption
from kvq_cli.train.fit import FitReport
from kvq_cli.train.pipeline import TrainConfig, train_controller

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
# tokens the default TrainConfig reads: 12 decode chunks of 1,024, and 512 prompts of 16-128 tokens
# (72 on average) with 16 continuation tokens each
DEFAULT_TOKENS = 12 * 1024 + 512 * (72 + 16)
MIN_TOKENS = 4096   # 3 decode chunks (TrainConfig's least) and 37 prompts

# Rough relative cost of one unit of each stage (one decode chunk of 1,024 tokens = 1, about 12 s for
# SmolLM2-135M on 2 threads; a prompt about 0.45 s): they weigh the stages in one progress total,
# so that its ETA holds across stages.
STAGE_COST = {"k_center": 0.1, "decode": 1.0, "prompt": 0.04, "fit": 0.12}
STAGE_NAMES = {"k_center": "K centering", "decode": "oracle: decode regime", "prompt": "oracle: prompt regime",
               "fit": "fitting the controller"}


def calibration_text() -> str:
    """The calibration prose kvq ships (data/README.md)."""
    return CALIBRATION_TEXT.read_text(encoding="utf-8")


def sized_config(tokens: int | None = None, budget: float | None = None) -> TrainConfig:
    """The default TrainConfig reading about `tokens` calibration tokens (None: DEFAULT_TOKENS), with
    decode chunks and prompts scaled alike."""
    cfg = TrainConfig() if budget is None else TrainConfig(budget=budget)
    if tokens is None:
        return cfg
    if tokens < MIN_TOKENS:
        raise BadOption(f"--calib-tokens must be at least {MIN_TOKENS}, got {tokens}")
    s = tokens / DEFAULT_TOKENS
    return replace(cfg, chunks=max(3, round(cfg.chunks * s)), prompts=max(20, round(cfg.prompts * s)))


def work_total(cfg: TrainConfig) -> float:
    """The progress total of a calibration: each stage's units weighed by STAGE_COST."""
    k = cfg.chunks if cfg.k_center else 0
    return (k * STAGE_COST["k_center"] + cfg.chunks * STAGE_COST["decode"] + cfg.prompts * STAGE_COST["prompt"]
            + cfg.epochs * STAGE_COST["fit"])


@dataclass(frozen=True)
class Calibration:
    """What `kvq calibrate` made: the controller, its training report, where it went, and how long it took."""

    spec: ControllerSpec
    report: FitReport
    out: Path
    seconds: float


Progress = Callable[[str, float, float], None]   # (stage name, work done, work total)


def calibrate(model: str | Path, out: str | Path | None = None, cfg: TrainConfig | None = None, *,
              text: str | None = None, n_threads: int | None = None,
              on_progress: Progress | None = None) -> Calibration:
    """Learn a controller for `model` and write `out` (default: the model itself, replaced atomically
    by a copy that carries the controller) with it embedded."""
    from kvq_cli.controller.embed import embed

    cfg = cfg or TrainConfig()
    src = Path(model)
    dst = Path(out) if out is not None else src
    total = work_total(cfg)
    done = {"k_center": 0.0, "decode": 0.0, "prompt": 0.0, "fit": 0.0}

    def report(stage: str, i: int, n: int) -> None:
        done[stage] = i * STAGE_COST[stage]
        if stage == "fit" and i >= n:   # early stopping: the fit is done
            done[stage] = cfg.epochs * STAGE_COST["fit"]
        if on_progress:
            on_progress(STAGE_NAMES[stage], sum(done.values()), total)

    t0 = time.perf_counter()
    spec, rep = train_controller(src, calibration_text() if text is None else text, cfg,
                                 calib_name="kvq calibration text" if text is None else "", n_threads=n_threads,
                                 on_chunk=report, on_epoch=lambda e, n, loss: report("fit", e, n))
    embed(src, spec, dst, replace_input=True)
    return Calibration(spec, rep, dst, time.perf_counter() - t0)
