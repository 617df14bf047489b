"""What every Tune experiment shares: the tuning tasks, a trial's resources and score, the Tuner
(restored when it exists), result rows, and the ``Experiment`` record of the dispatch table.

Experiments (``grid``, ``pbt``) build on this module; it imports none of them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ray import tune

from ppma_ray.config import PretrainConfig, SourceConfig
from ppma_ray.data import objectstore
from ppma_ray.data.catalog import task_name, task_source
from ppma_ray.data.manifest import write_ppma_manifest
from ppma_ray.errors import one_line
from ppma_ray.ray_env import quiet, quiet_process
from ppma_ray.train.checkpoint import ray_storage
from ppma_ray.train.data import resolve_sources
from ppma_ray.train.downstream import evaluate
from ppma_ray.train.runner import resolve_paths
from ppma_ray.tune.splits import group_split

TRIAL_CPU = 0.01  # the trial driver only waits on its TorchTrainer


@dataclass(frozen=True)
class Experiment:
    """One kind of Tune experiment. ``prepare`` may fix the config in place before it is shared
    with the trials; ``run`` runs the trials and writes the outputs (``trials.csv``, ``best.yaml``,
    ``tune.png``, ...) and returns one row per trial. Its settings are checked before anything
    runs, and before this module is imported (``tune/checks.py``)."""

    prepare: Callable[[PretrainConfig], None]
    run: Callable[[PretrainConfig, dict, Path], "list[dict]"]


def tuning_tasks(cfg: PretrainConfig, out_dir: Path) -> dict[str, SourceConfig]:
    """Write each task's group-aware split of its train list; returns sources for them."""
    cfg = copy.deepcopy(cfg)
    tasks = {}
    for task in cfg.eval.tasks:
        name = task_name(task)
        cfg.data.sources[name] = task_source(task, cfg.data.sources, cfg.eval.task_root)
        (src,) = resolve_sources(resolve_paths(cfg).data, [name])
        train, val = group_split(src.train.table, cfg.tune.val_fraction, cfg.tune.split_seed, cfg.tune.group_regex)
        d = out_dir / "splits" / name
        d.mkdir(parents=True, exist_ok=True)
        write_ppma_manifest(train, d / "tune_train.csv")
        write_ppma_manifest(val, d / "tune_val.csv")
        tasks[f"tune_{name}"] = SourceConfig(manifest=str(d / "tune_train.csv"), val_manifest=str(d / "tune_val.csv"),
                                             fps=src.train.fps)
    return tasks


def in_trial(cfg: PretrainConfig, live_trials: int) -> PretrainConfig:
    """A trial's start: its process as quiet as the job (the probes it runs use Ray Data here), and
    the live trial drivers' slivers of CPU taken from the training worker's share: decode tasks
    need whole free CPUs, and a node left with 0.99 CPU would never schedule one (the job would hang)."""
    quiet_process()
    cfg.scaling.cpus_per_worker = max(TRIAL_CPU, cfg.scaling.cpus_per_worker - live_trials * TRIAL_CPU)
    return cfg


def score(cfg: PretrainConfig, tasks: dict, model_name: str, checkpoints: list[str], **kw) -> dict:
    """LP top-1 on every tuning split, and their mean (the objective)."""
    metrics, extra = {}, {}
    for name, source in tasks.items():
        c = copy.deepcopy(cfg)
        c.data.sources[name] = source
        entry = evaluate(c, name, "lp", model_name, checkpoints, cache_features=not kw.get("learned_alpha"), **kw)
        metrics[f"lp_top1/{name[len('tune_'):]}"] = entry["top1"]
        if "learned_alpha" in entry:
            extra[f"learned_alpha/{name[len('tune_'):]}"] = entry["learned_alpha"][0]
    metrics["objective"] = sum(metrics.values()) / len(metrics)
    return {**metrics, **extra}


class TrialProgress(tune.Callback):
    """One console line per finished trial, with the experiment's ETA: the trials left at the mean
    time per trial finished by this process (an upper bound under ASHA, which stops some early).
    Counts come from the trials' states, so a restored experiment counts its finished trials."""

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.total, self.here, self.t0 = total_num_samples, 0, time.perf_counter()

    def _line(self, trials, trial) -> None:
        from ppma_ray.train.metrics import console, duration

        self.here += 1
        # Tune marks a completed trial TERMINATED just after this hook (an errored one just before)
        finished = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id}
        failed = sum(t.status == "ERROR" for t in trials)
        total = max(self.total or 0, len(trials))
        elapsed = time.perf_counter() - self.t0
        left = (total - len(finished)) * elapsed / self.here
        console(f"[tune] {len(finished)}/{total} trials finished" + (f" ({failed} failed)" if failed else "")
                + f", {duration(elapsed)}, eta {duration(left)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial)


def tracker_callbacks(cfg: PretrainConfig, name: str) -> list:
    """Tune's own W&B / MLflow callbacks for the trackers in ``run.loggers``: one tracker run per
    trial with its parameters and every reported row (objective, per-task top-1). The stages
    inside a trial log their steps themselves (``train/metrics.py``)."""
    from ppma_ray.train.metrics import mlflow_tracking_uri, wandb_project

    callbacks: list = []
    if "wandb" in cfg.run.loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=wandb_project(), group=name))
    if "mlflow" in cfg.run.loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        # without a tracking server: next to the runs (object storage: in the working directory)
        where = Path.cwd() if objectstore.is_uri(cfg.run.storage_path) else Path(cfg.run.storage_path)
        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_tracking_uri(where), experiment_name=name))
    return callbacks


def run_tuner(name: str, trainable, space: dict, cfg: PretrainConfig, search_alg=None, num_samples: int = 1,
              scheduler=None, max_concurrent: int | None = None) -> "tune.ResultGrid":
    """A Tune experiment under storage_path/name, restored (finished trials kept) when it exists.
    ``max_concurrent`` (None: no cap) limits live trials."""
    path = f"{cfg.run.storage_path}/{name}"
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPU})
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, param_space=space, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            # reuse_actors: a trial (or PBT's next round after an exploit) runs in the previous
            # trial's process instead of starting and importing a new one (seconds per trial)
            tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=num_samples, scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent, reuse_actors=True),
            # Tune's own tables and trial boxes only with --verbose: TrialProgress prints a line per trial
            run_config=tune.RunConfig(**ray_storage(cfg.run.storage_path), name=name, verbose=0 if quiet() else None,
                                      failure_config=tune.FailureConfig(fail_fast=False),
                                      callbacks=[TrialProgress(), *tracker_callbacks(cfg, name)]),
        )
    return tuner.fit()


def result_row(phase: str, result) -> dict:
    """One ``trials.csv`` row of a Tune result: parameters, per-task LP top-1, objective, status."""
    m = result.metrics or {}
    cfg = result.config or {}
    row = {"phase": phase, "trial": Path(result.path).name if result.path else "",
           "status": "done" if m.get("done") else ("failed" if result.error else "stopped")}
    row["p"] = m.get("p", cfg.get("p"))
    row["alpha"] = m.get("alpha", cfg.get("alpha") if phase == "avg" else None)
    for key, value in (cfg.get("extra") or {}).items():
        row[key] = value
    for key, value in m.items():
        if key in ("objective", "stage2_checkpoint", "p_schedule", "lineage") or \
                key.startswith(("lp_top1/", "learned_alpha/")):
            row[key] = value
    if result.error:
        row["error"] = one_line(result.error)
    return row
