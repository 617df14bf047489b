"""What a worker tells people and files: one progress line per log step, JSON lines, TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ppma_ray.train.step import StepResult


class MetricsLog:
    """Rank 0's JSON-lines file and TensorBoard writer (local or shared-filesystem storage only)."""

    def __init__(self, directory: Path | None, stage: str):
        self.jsonl = self.tb = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(directory / f"{stage}_metrics.jsonl", "a")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(directory / "tensorboard" / stage))

    def write(self, step: int, metrics: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


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
