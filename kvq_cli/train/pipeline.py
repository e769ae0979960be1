"""`kvq train` as a library call: options checked by TrainConfig, then collect -> fit."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from kvq_cli.controller.spec import DAMAGE_FLOOR_PERCENTILE, GRANULARITIES, V_WEIGHT, ControllerSpec
from kvq_cli.errors import BadOption
from kvq_cli.train.collect import REGIMES, calibration_data
from kvq_cli.train.fit import FitReport, train


@dataclass(frozen=True)
class TrainConfig:
    """What `kvq train` learns from: budget, decision granularity, calibration regime and sizes, MLP size."""

    budget: float = 3.5             # bits per decided row at price 0
    granularity: str = "token_layer"
    regime: str = "both"            # decode | prompt | both
    chunks: int = 12                # decode regime: calibration chunks (the last 2 held out)
    prompts: int = 512              # prompt regime: calibration prompts (10% held out)
    chunk_len: int = 1024
    window: int = 32                # the window W the controller is trained for (decode regime)
    hidden: int = 16
    epochs: int = 60
    seed: int = 0
    k_center: bool = True
    v_weight: float = V_WEIGHT
    damage_floor: float = DAMAGE_FLOOR_PERCENTILE
    # > 0: the controller normalises its features at run time, with a prior of this many rows
    # (ControllerSpec.norm_prior): the generic controller, trained without K centering
    norm_prior: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise BadOption(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity}")
        if not (2.25 <= self.budget <= 16):
            raise BadOption(f"--budget must be between 2.25 and 16 bits, got {self.budget:g}")
        if self.regime not in REGIMES:
            raise BadOption(f"--regime must be one of {', '.join(REGIMES)}, got {self.regime}")
        if not (self.v_weight > 0 and math.isfinite(self.v_weight)):
            raise BadOption(f"--v-weight must be a positive number, got {self.v_weight:g}")
        if not 0 <= self.damage_floor < 50:
            raise BadOption(f"--damage-floor must be a percentile in [0, 50), got {self.damage_floor:g}")
        if self.chunks < 3 or self.prompts < 20 or self.chunk_len < 4 * self.window + 64 or self.window < 1:
            raise BadOption("need --chunks >= 3, --prompts >= 20, --window >= 1 and --chunk-len >= 4 * window + 64")
        if self.norm_prior < 0 or (self.norm_prior and self.k_center):
            raise BadOption("norm_prior must be >= 0, and a controller normalised at run time carries no K centering")
        if self.hidden < 1 or self.epochs < 1:
            raise BadOption(f"--hidden and --epochs must be >= 1, got {self.hidden} and {self.epochs}")


def read_calibration(path: str | Path) -> str:
    """The calibration text of a file (never an evaluation set)."""
    if not Path(path).is_file():
        raise BadOption(f"--calib {path}: no such file")
    return Path(path).read_text(encoding="utf-8", errors="replace")


def train_controller(model: str | Path, text: str, cfg: TrainConfig, *, calib_name: str = "", cache: Path | None = None,
                     n_threads: int | None = None, on_chunk: Callable[[str, int, int], None] | None = None,
                     on_epoch: Callable[[int, int, float], None] | None = None) -> tuple[ControllerSpec, FitReport]:
    """Collect the oracle's calibration rows on `text` and fit a controller; its `extra` records the recipe.
    on_chunk(stage, i, n) reports the oracle passes (collect.calibration_data), on_epoch(e, n, loss) the fit."""
    data, n_held = calibration_data(model, text, regime=cfg.regime, cache=cache, n_chunks=cfg.chunks,
                                    n_prompts=cfg.prompts, chunk_len=cfg.chunk_len, window=cfg.window,
                                    n_threads=n_threads, on_chunk=on_chunk, k_center=cfg.k_center,
                                    v_weight=cfg.v_weight)
    spec, report = train(data, budget=cfg.budget, per_layer=cfg.granularity == "token_layer", hidden=cfg.hidden,
                         seed=cfg.seed, epochs=cfg.epochs, val_chunks=n_held, floor_percentile=cfg.damage_floor,
                         on_epoch=on_epoch)
    if cfg.norm_prior:
        spec.norm_prior = cfg.norm_prior
    spec.extra.update({"calib": calib_name, "regime": cfg.regime, "v_weight": cfg.v_weight,
                       **({} if cfg.regime == "prompt" else {"chunks": cfg.chunks, "chunk_len": cfg.chunk_len,
                                                             "window": cfg.window}),
                       **({} if cfg.regime == "decode" else {"prompts": cfg.prompts}),
                       "model": Path(model).name, "report": asdict(report)})
    return spec, report
