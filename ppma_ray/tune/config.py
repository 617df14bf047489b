"""The ``tune:`` section: what ``jobs/tune_mix.py`` searches and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ppma_ray.schema import ConfigError, option


@dataclass
class TuneSettings:
    """The stage-2 proportion p of the synthetic source (the no-human source gets 1 - p), the
    averaging coefficient alpha of the p = 1 and p = 0 models, and any other key."""

    p_values: list[float] = option(default_factory=lambda: [0.0, 0.5, 1.0], help="grid of the synthetic proportion p")
    search: Literal["grid", "random", "optuna", "hyperopt"] = option("grid", help="how p is searched (p = 0 and 1 always run)")
    num_samples: int = option(2, ge=0, help="extra p samples for random / optuna / hyperopt")
    extra: dict[str, list[float]] = option(default_factory=dict, help="dotted key -> grid values, searched with p")
    alpha_values: list[float] = option(default_factory=lambda: [0.25, 0.5, 0.75], help="fixed averaging coefficients tried")
    learned_alpha: bool = option(True, help="also learn the averaging coefficient with the linear probe")
    scheduler: Literal["none", "asha", "pbt"] = option("none", help="asha: early stopping on stage-2 val top-1; pbt: p changes during stage 2")
    # --scheduler pbt: a population whose p changes during stage 2 (exploit: copy a better trial's
    # checkpoint; explore: p x 0.8 or 1.2, or resampled), every ``pbt_interval`` stage-2 epochs
    pbt_population: int = option(4, ge=2, help="PBT trials, initial p evenly spaced over [0, 1]")
    pbt_interval: int = option(2, ge=1, help="PBT: stage-2 epochs per round")
    pbt_quantile: float = option(0.25, gt=0, le=0.5, help="PBT: the bottom fraction copies the top fraction")
    pbt_resample: float = option(0.25, ge=0, le=1, help="PBT: probability that explore resamples p")
    align_epochs: int | None = option(None, ge=1, help="stage-2 epochs per trial (null: align.epochs)")
    max_concurrent_trials: int = option(1, ge=1, help="cap by your GPUs: each trial uses scaling.num_workers")
    val_fraction: float = option(0.2, gt=0, lt=1, help="tuning split: held-out fraction of each task's train list")
    split_seed: int = option(42, help="seed of the tuning split")
    group_regex: str = option(r"_g(\d+)", help="file-name group id kept on one side of the tuning split")
    nohuman: str = option("nohuman", help="source name of the no-human data in data.sources")
    synthetic: str = option("synthetic", help="source name of the synthetic data in data.sources")
    fail_p: float | None = option(None, help="test hook: the trial with this p raises")

    def check(self) -> None:
        for key in ("p_values", "alpha_values"):
            for i, v in enumerate(getattr(self, key)):
                if not 0.0 <= v <= 1.0:
                    raise ConfigError.at(f"{key}[{i}]", f"must be in [0, 1], got {v}")
        if self.extra and self.scheduler == "pbt":
            raise ConfigError.at("extra", "PBT mutates p only; search other keys with scheduler none or asha")
        if self.search != "grid":
            for key, values in self.extra.items():
                if len(values) != 2:
                    raise ConfigError.at(f"extra.{key}", f"tune.search {self.search} samples a [low, high] range, got {values}")

    def mix(self, p: float) -> dict[str, float]:
        """The stage-2 source weights of synthetic proportion ``p`` (rounded so YAML stays readable)."""
        return {self.nohuman: round(1.0 - p, 6), self.synthetic: p}
