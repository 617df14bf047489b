"""Driver side: one ``TorchTrainer`` per stage, and the two-stage PPMA pretraining."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ppma_ray.config import PretrainConfig, to_dict
from ppma_ray.data.demo import make_demo
from ppma_ray.train.checkpoint import STATE_FILE
from ppma_ray.train.loop import train_loop


def resolve_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Absolute local paths (workers do not share the driver's working directory), and the demo
    data generated once, here, before any worker needs it."""
    cfg = copy.deepcopy(cfg)
    absolute = lambda p: p if p is None or "://" in p else os.path.abspath(p)  # noqa: E731
    cfg.run.storage_path = absolute(cfg.run.storage_path)
    cfg.data.demo_root = absolute(cfg.data.demo_root)
    for src in cfg.data.sources.values():
        if src.manifest.startswith("demo:"):
            continue
        src.manifest, src.root, src.val_manifest = absolute(src.manifest), absolute(src.root), absolute(src.val_manifest)
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


def run_stage(cfg: PretrainConfig, stage_name: str, init_from: str | None = None, run_name: str | None = None,
              callbacks: list | None = None, **loop_options) -> dict:
    """Train one stage on Ray Train; returns its summary (steps, final loss, clips/s, wall time,
    checkpoint directory, and per-source validation top-1 for stage 2).

    ``callbacks``: Ray Train callbacks (e.g. Tune's ``TuneReportCallback`` inside a trial).
    ``loop_options`` go to the worker loop: ``linear_probe``, ``average`` (learned weight
    averaging), ``test_views`` (clips, crops) for the final multi-view test, ``resume_from`` (a
    checkpoint directory whose full state this run continues) and ``stop_epoch`` (end early)."""
    run_name = run_name or f"{cfg.run.name}-{stage_name}"
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": to_dict(cfg), "stage": stage_name, "init_from": init_from,
                           "cpu_limit": decode_cpu_budget(cfg), "run_name": run_name, **loop_options},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=cfg.run.storage_path, name=run_name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    m = result.metrics or {}
    if "step" not in m and result.checkpoint:  # the stage had finished before: its last checkpoint knows
        with result.checkpoint.as_directory() as d:
            m = torch.load(Path(d) / STATE_FILE, weights_only=True).get("metrics", {})
    summary = {
        "steps": int(m.get("step", 0)),
        "final_loss": m.get("loss"),
        "clips_per_s": m.get("stage_clips_per_s"),
        "wall_s": wall,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "failed_clips": m.get("failed_clips", 0),
    }
    if stage_name == "align":
        summary["val_top1"] = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("val_top1/")}
        summary["train_top1"] = m.get("train_top1")
        for key in ("test_top1", "test_top5", "test_videos", "test_failed", "learned_alpha"):
            if key in m:
                summary[key] = m[key]
    return summary


def pretrain(cfg: PretrainConfig, stages: tuple[str, ...] = ("mae", "align"), init_from: str | None = None) -> dict:
    """Stage 1 (MAE) then stage 2 (alignment, initialised from stage 1's last checkpoint)."""
    cfg = resolve_paths(cfg)
    out: dict = {}
    for stage in stages:
        out[stage] = run_stage(cfg, stage, init_from=init_from if stage == stages[0] else out[stages[0]]["checkpoint"])
    return out


def run_dir(cfg: PretrainConfig) -> Path:
    return Path(cfg.run.storage_path).resolve() / cfg.run.name


def check_config(cfg: PretrainConfig) -> None:
    """Cheap checks before any worker starts; each error names the config key."""
    for stage_name in ("mae", "align"):
        stage = getattr(cfg, stage_name)
        if not stage.mix:
            raise ValueError(f"{stage_name}.mix: no sources to train on")
        mixes = [(f"{stage_name}.mix", stage.mix)]
        mixes += [(f"{stage_name}.mix_schedule[{i}]", m) for i, (_, m) in enumerate(stage.mix_schedule)]
        for key, mix in mixes:
            for name, w in mix.items():
                if name not in cfg.data.sources:
                    raise ValueError(f"{key}.{name}: no such source in data.sources ({sorted(cfg.data.sources)})")
                if not (w >= 0):
                    raise ValueError(f"{key}.{name}: weight must be >= 0, got {w}")
            if sum(mix.values()) <= 0:
                raise ValueError(f"{key}: at least one weight must be > 0")
        starts = [start for start, _ in stage.mix_schedule]
        if any(b <= a for a, b in zip(starts, starts[1:])) or any(s < 0 for s in starts):
            raise ValueError(f"{stage_name}.mix_schedule: start epochs must be >= 0 and increasing, got {starts}")
    for name, src in cfg.data.sources.items():
        if src.manifest.startswith("demo:"):
            continue
        for key in ("manifest", "val_manifest"):
            path = getattr(src, key)
            if path and "://" not in path and not Path(path).is_file():
                raise FileNotFoundError(f"data.sources.{name}.{key}: {path} does not exist")
