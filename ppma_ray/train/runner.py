"""Driver side: one ``TorchTrainer`` per stage, and the two-stage PPMA pretraining."""

from __future__ import annotations

import json
import re
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from ppma_ray.config import PretrainConfig, absolute_paths
from ppma_ray.data.demo import make_demo
from ppma_ray.errors import one_line
from ppma_ray.train.checkpoint import (FAILURES_FILE, REJECTS_FILE, checkpoint_dirs, location, newest_whole,
                                      open_checkpoint, ray_storage, storage, train_progress)
from ppma_ray.models.errors import CheckpointError
from ppma_ray.ray_env import quiet, quiet_process
from ppma_ray.train.config import RunOptions
from ppma_ray.train.runlock import InUse, run_lock
from ppma_ray.train.stop import StoppedBySignal, signalled


def resolve_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Absolute local paths (``absolute_paths``), and the demo data generated once, here, before
    any worker needs it."""
    cfg = absolute_paths(cfg)
    if any(s.manifest.startswith("demo:") for s in cfg.data.sources.values()):
        make_demo(cfg.data.demo_root, seed=cfg.data.demo_seed)
    return cfg


def decode_cpu_budget(cfg: PretrainConfig) -> float:
    """CPUs left to Ray Data after the training workers took theirs. Without this, workers that
    reserve every CPU leave the decode tasks unscheduled and the job hangs."""
    total = ray.cluster_resources().get("CPU", 1.0)
    left = total - cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if left < 1.0:
        raise ValueError(
            f"the training workers reserve {cfg.scaling.num_workers} x {cfg.scaling.cpus_per_worker} of {total:g} "
            f"CPUs, leaving {left:g} for decoding; lower scaling.cpus_per_worker (fractions are fine)"
        )
    return left


# Ray Train restores a run folder from this file, and refuses the whole folder when a checkpoint it
# lists is gone. Its storage layout is not a contract of ours: when it is in the way we set it aside.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def own_resume(cfg: PretrainConfig, options: RunOptions) -> RunOptions:
    """Decide where a re-run continues, before Ray Train starts, from the run folder itself:

    * Ray's run record (``checkpoint_manager_snapshot.json``) lists checkpoints that are gone or
      cannot be read, or a whole checkpoint newer than any it lists exists (the record was not
      updated after the checkpoint landed): the record is set aside and the run resumes from the
      newest whole checkpoint (``resume_from``), saying so.
    * Checkpoint folders the record does not list and that are not used (cut short during the
      write, or older than the record's) are deleted, saying so.
    * No checkpoint is whole: an error naming each folder and why. Raised here, it is never
      handed to Ray's restarts (``run.max_failures: -1`` would retry a damaged folder for ever).

    Otherwise Ray resumes the run as usual. Folder checks read files, so they are for local storage;
    on object storage only gone checkpoints are handled."""
    fs, base, shown = storage(cfg.run.storage_path)
    folder = f"{base.rstrip('/')}/{options.run_name}"
    try:
        with fs.open_input_stream(f"{folder}/{RAY_SNAPSHOT}") as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError):
        return options
    found = checkpoint_dirs(fs, folder)
    name = lambda path: path.rsplit("/", 1)[1]  # noqa: E731
    try:
        listed = {r["checkpoint_dir_name"] for r in json.loads(text)["checkpoint_results"]}
        gone = sorted(listed - {name(p) for p in found})
    except (ValueError, KeyError, TypeError):
        listed, gone = set(), ["(the snapshot cannot be read)"]
    newest, problems = newest_whole(fs, folder)
    local = isinstance(fs, pafs.LocalFileSystem)
    unlisted_newest = local and newest is not None and name(newest) not in listed
    if local:
        for path in found:
            if name(path) not in listed and path != newest:
                why = problems.pop(path, "not the newest whole checkpoint")
                fs.delete_dir(path)
                print(f"{shown}/{options.run_name}: removed checkpoint folder {name(path)}, which Ray's run record does "
                      f"not list ({why})", flush=True)
    if newest is None and problems:  # progress is there but damaged: an error, never a silent start from scratch
        raise CheckpointError(f"{shown}/{options.run_name}: no checkpoint in it is whole; "
                              + "; ".join(f"{p}: {problem}" for p, problem in problems.items())
                              + ". Start over with another run.name, or delete the folder")
    if not gone and not unlisted_newest:
        return options
    aside = f"{folder}/{RAY_SNAPSHOT}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
    fs.move(f"{folder}/{RAY_SNAPSHOT}", aside)
    reason = (f"lists checkpoints that are gone ({', '.join(gone)})" if gone
              else f"does not list the newest whole checkpoint ({name(newest)})")
    start = f"resumes from {newest}" if newest else "starts over: no checkpoint is left"
    print(f"{shown}/{options.run_name}: Ray's run record {reason}; it is set aside ({name(aside)}) and the run {start}",
          flush=True)
    if newest is None:
        return options
    return replace(options, resume_from=f"{shown}/{options.run_name}/{name(newest)}")


def worker_entry(loop_config: dict) -> None:
    """What Ray Train runs on every worker: ``train_loop``, imported here rather than at module
    level. The trainer's controller actor unpickles this function too, and only needs its name:
    importing the training stack there (torchvision, timm, Ray Data's operators) costs about 4 s
    of CPU per stage on 2 cores, for nothing."""
    from ppma_ray.train.loop import train_loop

    quiet_process()  # after Ray Train configured this worker's logging
    try:
        train_loop(loop_config)
    except Exception as e:
        rank = ray.train.get_context().get_world_rank()
        note_traceback(e, loop_config["config"], loop_config["options"], rank)
        raise


def note_traceback(e: BaseException, cfg: PretrainConfig, options: RunOptions, rank: int) -> None:
    """Save the exception being handled (``save_traceback``) and note the file on ``e``: the note is
    pickled with the exception, so the driver's one line names the file (``failure_line``). The note
    is what ``e.add_note`` adds on Python 3.11+, written so that 3.10 has it too (there an attribute
    that the printed traceback leaves out)."""
    e.__notes__ = [*getattr(e, "__notes__", ()), f"traceback: {save_traceback(cfg, options, rank)}"]


def save_traceback(cfg: PretrainConfig, options: RunOptions, rank: int) -> str:
    """Write the exception being handled, in full, to ``<run folder>/errors/rank<R>-<time>.txt``
    (next to the checkpoints, local or object storage); returns that path. The console gets one
    line naming it, not the traceback."""
    fs, base, shown = storage(cfg.run.storage_path)
    name = f"{options.run_name}/errors/rank{rank}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    try:
        fs.create_dir(f"{base.rstrip('/')}/{options.run_name}/errors")
        with fs.open_output_stream(f"{base.rstrip('/')}/{name}") as f:
            f.write(traceback.format_exc().encode())
    except OSError as e:  # the storage itself failing: say so rather than hide the first error
        return f"not written ({e}); see the Ray worker logs"
    return f"{shown}/{name}"


class StageFailed(RuntimeError):
    """A stage's Ray Train run failed; the message is one line per failed rank (the error's first
    line and the file in the run folder holding its traceback)."""


@contextmanager
def holding(cfg: PretrainConfig, run_name: str):
    """Hold run ``run_name``'s folder (``train/runlock.py``) while the block runs; another job
    holding it is a ``StageFailed``, which the jobs print as one line."""
    try:
        with run_lock(cfg.run.storage_path, run_name):
            yield
    except InUse as e:
        raise StageFailed(str(e)) from None


def failure_line(run_name: str, error: Exception) -> str:
    """``<run> failed: rank R: Type: first line (traceback: FILE)`` for Ray Train's error; a worker
    that died without a Python error is said so (``worker_death``)."""
    parts = []
    for rank, exc in sorted((getattr(error, "worker_failures", None) or {}).items()):
        base = getattr(exc, "_base_exc", exc)  # Ray wraps the worker's exception with its traceback text
        notes = [n for n in getattr(base, "__notes__", []) if n.startswith("traceback: ")]
        parts.append(f"rank {rank}: {worker_death(base) or one_line(base, 300)}" + (f" ({notes[0]})" if notes else ""))
    return f"{run_name} failed: " + "; ".join(parts or [one_line(error, 300)])  # none: the controller failed


def resume_hint(cfg: PretrainConfig, run_name: str) -> str:
    """What the same command does after a failed stage: it resumes from the run's newest whole
    checkpoint (named, with its step when local), or starts the stage over."""
    try:  # said after a failure: a second one here (the storage itself failing) must not hide the first
        fs, base, shown = storage(cfg.run.storage_path)
        newest = newest_whole(fs, f"{base.rstrip('/')}/{run_name}")[0]
        if newest is None:
            return "it left no checkpoint: the same command starts the stage over"
        step = f" (step {train_progress(newest)['step']})" if isinstance(fs, pafs.LocalFileSystem) else ""
    except Exception as e:  # noqa: BLE001
        return f"its checkpoints could not be listed ({one_line(e)})"
    return f"the same command resumes from {shown}/{run_name}/{newest.rsplit('/', 1)[1]}{step}"


def worker_death(exc: BaseException) -> str | None:
    """How a training worker ended that raised nothing (None: it raised). Ray Train reports such a
    worker as a failed health check (``WorkerHealthCheckFailedError: A worker health check
    failed.``, all its first line says) holding the actor's death, whose text names the process,
    the node and why: its process was killed or crashed, its node died, or Ray's memory monitor
    killed it."""
    death = getattr(exc, "health_check_failure", None)
    if death is None:
        return None
    text = str(death)
    pid, ip = (re.search(rf"^\s*{key}: (\S+)$", text, re.M) for key in ("pid", "ip"))
    where = " on ".join(([f"pid {pid.group(1)}"] if pid else []) + ([ip.group(1)] if ip else []))
    where = f" ({where})" if where else ""
    # Ray's cause: "The actor is dead because its worker process has died.", "The actor died because its
    # node has died.", "... because it was killed by `ray.kill`."
    cause = re.search(r"^The actor (?:is dead|died) because (.+?)\.(?:\s|$)", text, re.M)
    if cause is None:
        return f"its worker{where} died: {one_line(death, 300)}"
    part = re.fullmatch(r"(its [\w ]+?) has died", cause.group(1))  # its worker process, its node, its owner
    if part is None:
        return f"its worker{where} died: {cause.group(1)}"
    said = f"{part.group(1)}{where} died"
    exit_type = re.search(r"Worker exit type: (\w+)", text)
    if exit_type and exit_type.group(1) == "NODE_OUT_OF_MEMORY":
        return f"{said}: Ray's memory monitor killed it, the node running low on memory"
    if part.group(1) == "its worker process":
        return (f"{said} without a Python error: killed (by the kernel's OOM killer, kill -9 or ray stop --force) or "
                f"crashed (a segfault)")
    return said


def run_stage(cfg: PretrainConfig, options: RunOptions, callbacks: list | None = None,
              output_dir: Path | None = None) -> dict:
    """Train one stage on Ray Train; returns its summary (steps, final loss, clips/s, wall time,
    checkpoint directory, decode failures per source and the rejects CSV; per-source validation
    top-1 for ``align``, the test protocol's top-1/5 for ``lp`` and ``ft``).

    ``callbacks``: Ray Train callbacks (e.g. Tune's ``TuneReportCallback`` inside a trial).
    ``output_dir``: the rejects CSV is copied there as ``rejects_<run name>.csv`` (else it is the
    one in the last checkpoint)."""
    options = replace(options, run_name=options.run_name or f"{cfg.run.name}-{options.stage}",
                      decode_cpus=decode_cpu_budget(cfg))
    with holding(cfg, options.run_name):  # held from the resume decision to the end
        return _run_stage(cfg, options, callbacks, output_dir)


def _run_stage(cfg: PretrainConfig, options: RunOptions, callbacks: list | None, output_dir: Path | None) -> dict:
    options = own_resume(cfg, options)
    s = cfg.scaling
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={"config": cfg, "options": options},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=s.worker_bundle()),
        run_config=RunConfig(
            **ray_storage(cfg.run.storage_path), name=options.run_name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep),
            # a preempted node (Ray Train's own signal, see train/stop.py) is retried apart from real failures
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         max_preemption_failures=cfg.run.max_preemption_failures),
            callbacks=callbacks,
            # without --verbose: none of Ray Train's own lines (each report, each checkpoint, the
            # controller's traceback of a failure: the job prints one line naming the saved one)
            logging_config=ray.train.LoggingConfig(log_level="CRITICAL" if quiet() else "INFO"),
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise StageFailed(f"{failure_line(options.run_name, e)}; {resume_hint(cfg, options.run_name)}") from e
    wall = time.perf_counter() - t0
    m = result.metrics or {}
    checkpoint, where = result.checkpoint, None
    if checkpoint is None and options.resume_from:
        # the checkpoint it resumed from had finished its epochs (a given one, or its own newest once
        # Ray's run record was set aside): nothing ran, so that one is the stage's last checkpoint
        checkpoint, where = open_checkpoint(options.resume_from), options.resume_from
    if "step" not in m and checkpoint:  # the stage had finished before: its last checkpoint knows
        with checkpoint.as_directory() as d:
            m = train_progress(d).get("metrics", {})
    summary = {
        "steps": int(m.get("step", 0)),
        "final_loss": m.get("loss"),
        "clips_per_s": m.get("stage_clips_per_s"),
        "wall_s": wall,
        "checkpoint": where or (location(checkpoint, cfg.run.storage_path) if checkpoint else None),
        "failed_clips": m.get("failed_clips", 0),
    }
    if checkpoint:
        summary.update(_data_failures(checkpoint, m, output_dir and Path(output_dir) / f"rejects_{options.run_name}.csv"))
    signum = signalled(options.stop_flag)
    if signum is not None:
        raise StoppedBySignal(signum, options.stage, summary)
    if options.stage == "align":
        summary["val_top1"] = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("val_top1/")}
        summary["train_top1"] = m.get("train_top1")
    for key in ("test_top1", "test_top5", "test_videos", "test_failed", "learned_alpha"):
        if key in m:
            summary[key] = m[key]
    return summary


def _data_failures(checkpoint, metrics: dict, copy_to: Path | None) -> dict:
    """``data_failures`` (``{source: {"videos", "failed"}}``) and ``rejects`` (the CSV's path) of a
    stage, from its last checkpoint (through its filesystem: local or object storage)."""
    fs, base = checkpoint.filesystem, checkpoint.path
    out: dict = {"data_failures": metrics.get("data_failures")}
    if out["data_failures"] is None:  # the stage had finished before: its checkpoint knows
        try:
            with fs.open_input_stream(f"{base}/{FAILURES_FILE}") as f:
                out["data_failures"] = json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            out["data_failures"] = {}
    out["rejects"] = f"{base}/{REJECTS_FILE}"
    if copy_to is not None:
        try:
            with fs.open_input_stream(out["rejects"]) as f:
                data = f.read()
        except (FileNotFoundError, OSError):  # a checkpoint written before rejects were kept
            return {**out, "rejects": None}
        copy_to.parent.mkdir(parents=True, exist_ok=True)
        copy_to.write_bytes(data)
        out["rejects"] = str(copy_to)
    return out


def pretrain(cfg: PretrainConfig, stages: tuple[str, ...] = ("mae", "align"), init_from: str | None = None,
             init_partial: bool = False, resume_from: str | None = None, output_dir: Path | None = None,
             stop_flag: str | None = None) -> dict:
    """Stage 1 (MAE) then stage 2 (alignment, initialised from stage 1's last checkpoint).
    ``resume_from``: a checkpoint of the first stage whose full state that stage continues.
    ``stop_flag``: the job's graceful-stop flag (``train/stop.py``)."""
    cfg = resolve_paths(cfg)
    out: dict = {}
    for stage in stages:
        first = stage == stages[0]
        if not first and out[stages[0]]["checkpoint"] is None:  # never a silent start from random init
            raise CheckpointError(f"{stages[0]} ended without a checkpoint, so {stage} has nothing to start from")
        start = (None if resume_from else init_from) if first else out[stages[0]]["checkpoint"]
        out[stage] = run_stage(cfg, RunOptions(stage, init_from=start, init_partial=init_partial and first,
                                               resume_from=resume_from if first else None, stop_flag=stop_flag),
                               output_dir=output_dir)
    return out


