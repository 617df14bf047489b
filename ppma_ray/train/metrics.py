"""What a worker tells people and files: one progress line per log step, and the metrics of each
log step in every logger of ``run.loggers`` (JSON lines, TensorBoard, W&B, MLflow)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ppma_ray.data.objectstore import upload_folder
from ppma_ray.schema import flatten
from ppma_ray.train.step import StepResult

DEFAULT_LOGGERS = ("tensorboard", "jsonl")


def wandb_project() -> str:
    """The W&B project of every run of this project: ``WANDB_PROJECT``, else ``ppma_ray``."""
    return os.environ.get("WANDB_PROJECT", "ppma_ray")


def mlflow_tracking_uri(folder: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store in ``folder``. MLflow's own local default, the
    file store, is in maintenance mode and raises unless ``MLFLOW_ALLOW_FILE_STORE`` is set; SQLite
    needs no server and no network."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder.resolve() / 'mlflow.db'}"


class MetricsLog:
    """Rank 0's loggers. Files (the JSON-lines file, TensorBoard's events, W&B's offline run,
    MLflow's default SQLite store) go to ``directory``: the run folder on local or shared storage;
    with object storage (``remote``: the filesystem and path of the run folder) a node-local
    folder whose contents are uploaded next to the checkpoints at every checkpoint (``upload``) and
    at the end.
    W&B and MLflow start through Ray's integrations (``setup_wandb``, ``setup_mlflow``); their
    runs are named after the stage's run, and the run's whole config is logged as parameters."""

    def __init__(self, directory: Path | None, stage: str, loggers=DEFAULT_LOGGERS, run_name: str = "",
                 config: dict | None = None, remote: tuple | None = None):
        self.jsonl = self.tb = self.wandb = self.mlflow = None
        self.directory, self.remote = directory, remote
        if directory is None:
            return
        if remote:  # a node-local copy: start from what the run uploaded, never from another run's leftovers
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        if "jsonl" in loggers:
            name = f"{stage}_metrics.jsonl"
            if remote:  # a restart on another node continues the file the run uploaded so far
                self._download(name)
            self.jsonl = open(directory / name, "a")
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(directory / "tensorboard" / stage))
        params = flatten(config or {})
        if "wandb" in loggers:
            from ray.air.integrations.wandb import setup_wandb

            # the stage's run name is the W&B run id: a restarted or re-run stage continues its W&B run
            self.wandb = setup_wandb(config=params, rank_zero_only=False, trial_id=run_name, trial_name=run_name,
                                     project=wandb_project(), resume="allow",
                                     dir=str(directory))
        if "mlflow" in loggers:
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = setup_mlflow(config={k: str(v)[:500] for k, v in params.items()},
                                       tracking_uri=mlflow_tracking_uri(directory),
                                       experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "ppma_ray"),
                                       run_name=run_name, create_experiment_if_not_exists=True, rank_zero_only=False)

    def write(self, step: int, metrics: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb and numbers:
            self.wandb.log(numbers, step=step)
        if self.mlflow and numbers:
            self.mlflow.log_metrics(numbers, step=step)

    def upload(self) -> None:
        """With object storage: the logger files, next to the checkpoints (same names as on local storage)."""
        if self.remote and self.directory is not None:
            upload_folder(self.directory, *self.remote)

    def _download(self, name: str) -> None:
        import pyarrow.fs as pafs

        fs, folder = self.remote
        path = f"{folder}/{name}"
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:
                (self.directory / name).write_bytes(f.read())

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()
        self.upload()


# The process's own stdout, written without ``print``: Ray Train replaces ``print`` in its workers
# with one that sends the line to its logger and, depending on how stdout is wrapped, echoes it too,
# which showed every progress line twice on a cluster. Ray forwards this stream to the driver once.
_CONSOLE = sys.__stdout__ or sys.stdout


def console(message: str) -> None:
    """One line for the person watching the run, printed once from a Ray Train worker."""
    _CONSOLE.write(message + "\n")
    _CONSOLE.flush()


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for the progress line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Running means since the last log step: loss, throughput and the time spent waiting for data.

    The loss is summed on the device and read at log steps only (``line``), so steps in between
    never wait for the GPU."""

    def __init__(self, stage: str, total_steps: int, epochs: int, world: int, verbose: bool):
        self.stage, self.total_steps, self.epochs, self.world, self.verbose = stage, total_steps, epochs, world, verbose
        self.t_start = time.perf_counter()
        self.clips_done = self.steps_done = 0
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.wait, self.clips, self.t0 = None, 0, 0.0, 0, time.perf_counter()

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, result: StepResult, clips_per_rank: int) -> None:
        clips = clips_per_rank * self.world
        self.clips += clips
        self.clips_done += clips
        self.steps_done += 1
        self.steps += 1
        loss = torch.where(result.taken, result.loss, torch.zeros_like(result.loss))  # a skipped step adds 0
        self.loss = loss if self.loss is None else self.loss + loss

    def line(self, step: int, epoch: int, lr: float, result: StepResult, failed_clips: int) -> dict:
        """The window's metrics (printed as one line on rank 0); starts a new window."""
        loss = float(self.loss) / max(1, self.steps) if self.loss is not None else 0.0  # waits for the device
        now = time.perf_counter()
        elapsed = now - self.t0
        extra = {k: float(v) for k, v in result.extra.items()}
        m = {"loss": loss, "lr": lr, "grad_norm": float(result.grad_norm),
             "clips_per_s": self.clips / elapsed, "data_wait_frac": min(1.0, self.wait / elapsed),
             "failed_clips": failed_clips, **extra}
        # the stage's remaining steps at this process's mean step time so far (validation included)
        m["eta_s"] = (self.total_steps - step) * (now - self.t_start) / max(1, self.steps_done)
        if self.verbose:
            console(f"[{self.stage}] epoch {epoch + 1}/{self.epochs} step {step}/{self.total_steps} loss {m['loss']:.4f} "
                    f"lr {lr:.2e} grad {m['grad_norm']:.2f} {m['clips_per_s']:.1f} clips/s "
                    f"data-wait {m['data_wait_frac']:.0%} failed {failed_clips} eta {duration(m['eta_s'])}")
        self._reset()
        return m

    def totals(self) -> dict:
        wall = time.perf_counter() - self.t_start
        return {"stage_clips_per_s": self.clips_done / wall, "stage_wall_s": wall}
