"""Data mixing vs weight mixing, searched with Ray Tune: the entry point and the dispatch table.

1. Stage 1 (MAE) runs once, or is given: every trial starts from the same checkpoint.
2. The experiment that ``tune.scheduler`` names runs its trials, each scored by linear probes on
   every downstream task's group-aware tuning split (objective: the mean LP top-1):
   ``none`` / ``asha``: a fixed p per trial, then weight averaging (``tune/grid.py``);
   ``pbt``: p changes during stage 2 (``tune/pbt.py``).
Re-running the same command restores the experiment from ``storage_path``; finished trials are not
run again, a failing trial is recorded and skipped.

A new kind of experiment is one module with an ``EXPERIMENT`` and one entry in ``EXPERIMENTS``; its
settings go in ``TuneSettings`` (``tune/config.py``), checked as the config loads, and any check
against other sections in ``tune/checks.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ppma_ray.config import PretrainConfig, to_dict
from ppma_ray.train.checkpoint import is_remote
from ppma_ray.train.config import RunOptions
from ppma_ray.train.runner import holding, resolve_paths, run_stage
from ppma_ray.tune import grid, pbt
from ppma_ray.tune.checks import check, write_record
from ppma_ray.tune.trial import Experiment, tuning_tasks

EXPERIMENTS: dict[str, Experiment] = {"none": grid.EXPERIMENT, "asha": grid.EXPERIMENT, "pbt": pbt.EXPERIMENT}


def run_experiment(cfg: PretrainConfig, out_dir: str | Path, stage1: str | None = None) -> dict:
    """Stage 1 (unless given), then the experiment; its outputs go to ``out_dir``. One job at a time
    per run name (``<run.name>-tune`` held, ``StageFailed`` if another job holds it): two would
    restore and run the same trials into one Tune folder."""
    with holding(cfg, f"{cfg.run.name}-tune"):
        return _run_experiment(cfg, out_dir, stage1)


def _run_experiment(cfg: PretrainConfig, out_dir: str | Path, stage1: str | None) -> dict:
    check(cfg)
    if stage1 is not None and not is_remote(stage1):
        stage1 = os.path.abspath(stage1)  # as out: a relative path would be read from a trial's folder
    given, given_stage1 = cfg, stage1
    experiment = EXPERIMENTS[cfg.tune.scheduler]
    cfg = resolve_paths(cfg)
    out = Path(out_dir).resolve()  # trials run in their own working directories
    out.mkdir(parents=True, exist_ok=True)
    if stage1 is None:  # one MAE for every trial (resumes / returns at once when already done)
        stage1 = run_stage(cfg, RunOptions("mae"))["checkpoint"]
    experiment.prepare(cfg)  # e.g. PBT fixes stage 2's length, for the trials and for best.yaml
    write_record(given, given_stage1)  # what a re-run is checked against (check_restore)
    common = {"base": to_dict(cfg), "stage1": stage1, "tasks": tuning_tasks(cfg, out)}
    return {"rows": experiment.run(cfg, common, out)}
