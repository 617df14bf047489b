"""The Ray Train worker shared by every stage, torchtitan style: ``setup`` -> ``restore`` -> a loop
of ``train_step`` (``train/step.py``) -> end-of-epoch work (validation, the downstream test,
checkpoint and report).

    train_loop({"config": PretrainConfig, "options": RunOptions})

The stage kind (``mae``, ``align``, ``lp``, ``ft``) picks the model, the loss and the end-of-epoch
work; the config section of the same name gives the schedule, the mix and the optimizer. A run
always continues from ``ray.train.get_checkpoint()`` when there is one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray.data
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ppma_ray.config import PretrainConfig, ScalingSettings, StageConfig, StageKind, to_dict
from ppma_ray.errors import one_line
from ppma_ray.train.config import RunOptions
from ppma_ray.data import objectstore
from ppma_ray.data.pipeline import FailureTracker
from ppma_ray.files import write_text_atomic
from ppma_ray.models import build_model
from ppma_ray.models.averaging import LearnedAverage
from ppma_ray.models.checkpoint import load_trunk, load_trunks
from ppma_ray.models.errors import CheckpointError
from ppma_ray.train.checkpoint import (FAILURES_FILE, REJECTS_FILE, checkpoint_dirs, checkpoint_problem,
                                      load_checkpoint, open_checkpoint, resolve_checkpoint, save_checkpoint, step_seed,
                                      storage)
from ppma_ray.train.data import EpochStream, ResolvedSource, resolve_sources
from ppma_ray.train.evaluate import multiview_test
from ppma_ray.train.metrics import MetricsLog, Progress, console
from ppma_ray.train.optim import build_optimizer, lr_at
from ppma_ray.train.stages import AlignLoss, mae_loss
from ppma_ray.train.stop import preemption_notice, requested as stop_requested
from ppma_ray.train.step import LossFn, WorkerContext, prefetch_to_device, train_step

# consecutive non-finite steps before the run is stopped; counted on the device and checked at log
# steps (reading it every step would make each step wait for the GPU)
MAX_SKIPPED_STEPS = 5


@dataclass
class TrainState:
    """Saved in ``train_state.pt`` with the optimizer: where the run is, to the sample."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # the data plan's cursor
    seed: int = 0
    skipped_steps: int = 0  # consecutive non-finite steps
    metrics: dict = field(default_factory=dict)  # the last report's, so a finished run can be summarised
    data_failures: dict = field(default_factory=dict)  # FailureTracker.state_dict(): every rank's, merged

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


@dataclass
class Stage:
    """What ``setup`` builds for one stage run."""

    model: nn.Module  # unwrapped (``wrap_ddp`` wraps it later)
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # the trainable ones (grad-norm and clipping)
    sources: list[ResolvedSource]
    head_of_source: list[str]  # classifier stages: which head scores each source


def head_layout(stage: StageConfig, sources) -> tuple[list[str], dict[str, int]]:
    """Which head scores each source, and each head's class count."""
    counts = [int(s.table.column("label").to_numpy().max()) + 1 for s in sources]
    if stage.heads == "shared":
        return ["default"] * len(sources), {"default": max(counts)}
    return [s.name for s in sources], {s.name: n for s, n in zip(sources, counts)}


def stage_model(cfg: PretrainConfig, kind: StageKind, num_classes: dict[str, int] | None = None) -> nn.Module:
    """The model of stage ``kind``: MAE for ``mae``, a classifier otherwise."""
    clip = cfg.data.clip
    return build_model(cfg.model, "mae" if kind == "mae" else "classifier", num_classes, img_size=clip.img_size,
                       num_frames=clip.num_frames, drop_path_rate=getattr(cfg, kind).drop_path_rate)


def setup(cfg: PretrainConfig, options: RunOptions, ctx: WorkerContext) -> Stage:
    stage = getattr(cfg, options.stage)
    sources = resolve_sources(cfg.data, stage.source_names())
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank and every run
    if options.stage == "mae":
        model, loss_fn, heads = stage_model(cfg, "mae"), mae_loss, []
    else:
        heads, num_classes = head_layout(stage, [s.train for s in sources])
        model = stage_model(cfg, options.stage, num_classes)
        loss_fn = AlignLoss(heads, num_classes, stage.label_smoothing, stage.mixup_alpha, stage.cutmix_alpha,
                            stage.random_erase, device=ctx.device)
    model.set_grad_checkpointing(stage.grad_checkpointing)
    model.to(ctx.device)
    if options.average:  # learned weight averaging of K checkpoints, trained with the LP head
        trunks = load_trunks([str(resolve_checkpoint(c)) for c in options.average.checkpoints])  # URIs: local copies
        model = LearnedAverage(model, trunks, options.average.per_layer).to(ctx.device)
    elif options.stage == "lp":  # a drop-path rate for the LP keeps it active on the frozen trunk (release)
        model.set_linear_probe(True, trunk_drop_path=stage.drop_path_rate > 0)
    optimizer = build_optimizer(model, stage.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    compile_model(model, cfg.scaling)
    return Stage(model, loss_fn, optimizer, params, sources, heads)


def compile_model(model: nn.Module, scaling: ScalingSettings) -> nn.Module:
    """``torch.compile`` in place (``nn.Module.compile``): the module's ``__call__`` is compiled and
    its parameters and state-dict keys stay as they are, so checkpoints do not change."""
    if scaling.compile:
        model.compile(backend=scaling.compile_backend)
    return model


def restore(cfg: PretrainConfig, options: RunOptions, stage: Stage, rank: int) -> TrainState:
    """Every way a run can start, in order: its own newest valid checkpoint (resumed or restarted),
    another run's full state (``resume_from``), trunk weights (``init_from``), or fresh."""
    own = ray.train.get_checkpoint()
    if own is not None:
        return _resume(_newest_first(own), stage, rank)
    if options.resume_from:
        return _resume([open_checkpoint(options.resume_from)], stage, rank)  # a path or a URI
    if options.init_from:
        report = _load_init(getattr(stage.model, "classifier", stage.model), options.init_from, not options.init_partial)
        if rank == 0:
            console(f"[{options.stage}] initialised from {options.init_from}: {report}")
    return TrainState(seed=cfg.run.seed)


def _newest_first(latest: "ray.train.Checkpoint") -> list:
    """The run's newest checkpoint, then the older ones kept beside it (``run.keep``), newest
    first: Ray names them ``checkpoint_<time>``."""
    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    older = [p for p in checkpoint_dirs(latest.filesystem, parent) if p.rstrip("/") != latest.path.rstrip("/")]
    return [latest, *(ray.train.Checkpoint(p, filesystem=latest.filesystem) for p in older)]


def _resume(candidates: list, stage: Stage, rank: int) -> TrainState:
    """The state of the first checkpoint that is whole and loads; each one passed over is named
    with the reason. None usable: an error naming them all (a corrupt file never gets better)."""
    problems = []
    for checkpoint in candidates:
        with checkpoint.as_directory() as d:
            problem = checkpoint_problem(d)
            if problem is None:
                try:
                    state = TrainState.from_saved(load_checkpoint(d, stage.model, stage.optimizer))
                except Exception as e:  # e.g. a model of another config: reported below, with the folder
                    problem = one_line(e, 300)
                else:
                    if rank == 0:  # said every time: which checkpoint a run continues is never left to guess
                        console(f"resuming from {checkpoint.path} (step {state.step})")
                    return state
        problems.append(f"{checkpoint.path}: {problem}")
        if rank == 0:
            console(f"WARNING: checkpoint {checkpoint.path} cannot be resumed from ({problem}); trying an older one")
    raise CheckpointError("no checkpoint to resume from is usable: " + "; ".join(problems))


def train_loop(loop_config: dict) -> None:
    cfg: PretrainConfig = loop_config["config"]
    options: RunOptions = loop_config["options"]
    stage_cfg = getattr(cfg, options.stage)
    context = ray.train.get_context()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our progress line is the readable one
    world = context.get_world_size()
    ctx = WorkerContext(context.get_world_rank(), world, ray.train.torch.get_device(),
                        cfg.data.clip, cfg.data.decode.with_budget(options.decode_cpus).per_rank(world))

    stage = setup(cfg, options, ctx)
    state = restore(cfg, options, stage, ctx.rank)
    end = min(stage_cfg.epochs, options.stop_epoch or stage_cfg.epochs)
    if state.epoch >= end:  # finished before; the driver reads the checkpoint's metrics
        return
    model = wrap_ddp(stage.model, ctx)

    stream = EpochStream([s.train for s in stage.sources], stage_cfg, ctx.clip, ctx.decode, cfg.run.seed,
                         ctx.world, ctx.rank)
    tracker = FailureTracker([s.train for s in stage.sources], ctx.decode.max_failure_rate, backend=ctx.decode.backend)
    if state.data_failures:
        tracker.load_state_dict(state.data_failures)
    total_steps = stage_cfg.epochs * stream.steps_per_epoch
    log_dir, remote = _log_dirs(cfg, options.run_name)
    log = MetricsLog(log_dir if ctx.rank == 0 else None, options.stage, cfg.run.loggers, options.run_name, to_dict(cfg),
                     remote)
    if state.step:  # lines after this one redo steps the file may already hold (from before a crash)
        log.write(state.step, {"event": "resumed"})
    progress = Progress(options.stage, total_steps, stage_cfg.epochs, ctx.world, verbose=ctx.rank == 0)
    metrics: dict = {}
    model.train()
    skipped = torch.full((), state.skipped_steps, device=ctx.device)
    preempt_saved = False  # one checkpoint per preemption notice (a restart starts a new loop)
    stream_batches = stream.iterate(state.epoch, state.step_in_epoch, end, pin_memory=ctx.device.type == "cuda")
    t_fetch = time.perf_counter()
    for (epoch, i, weight, clips), batch in prefetch_to_device(ctx, _without_failed(stream_batches, tracker)):
        progress.waited(time.perf_counter() - t_fetch)
        if cfg.run.fail_at_step == state.step and ctx.rank == 0:
            _fail_once(cfg, options.run_name, state.step)
        seed = step_seed(cfg.run.seed, ctx.rank, state.step)
        torch.manual_seed(seed)
        random.seed(seed)  # timm's random erasing draws its boxes from Python's generator
        lr = lr_at(state.step, total_steps, stage_cfg.optim)
        result = train_step(ctx, model, stage.loss_fn, stage.optimizer, stage.params, batch, lr,
                            stage_cfg.optim.clip_grad, weight, stage_cfg.accum_steps)
        skipped = torch.where(result.taken, torch.zeros_like(skipped), skipped + 1)
        state.step += 1
        state.epoch, state.step_in_epoch = epoch, i + 1
        progress.add(result, clips)
        end_of_epoch = i + 1 == stream.steps_per_epoch
        stop = cfg.run.max_steps is not None and state.step >= cfg.run.max_steps
        report = (cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0) or end_of_epoch or stop
        log_line = state.step % cfg.run.log_every == 0 or end_of_epoch
        if log_line or report:  # the host reads device values here only
            if stop_requested(options.stop_flag, ctx.world, ctx.device):
                stop = report = True
            if not preempt_saved and (notice := preemption_notice()):  # checkpoint now, train on
                report = preempt_saved = True
                if ctx.rank == 0:
                    console(f"[{options.stage}] {notice}: checkpoint at step {state.step}")
            state.skipped_steps = int(skipped)
            if state.skipped_steps > MAX_SKIPPED_STEPS:
                raise FloatingPointError(f"{options.stage}: loss or gradient not finite for {state.skipped_steps} steps "
                                         f"in a row (step {state.step})")
        if log_line:
            metrics = progress.line(state.step, epoch, lr, result, tracker.failed_clips)
            log.write(state.step, metrics)
        if end_of_epoch:
            state.epoch, state.step_in_epoch = epoch + 1, 0
            evaluated = epoch_end(cfg, options, stage, model, ctx, epoch, log_dir)
            if evaluated:
                metrics.update(evaluated)
                log.write(state.step, {k: v for k, v in evaluated.items() if k.startswith(("val", "test"))})
                model.train()
        if report:
            if ctx.world > 1:  # every rank saw other videos: the checkpoint keeps the union
                states = [None] * ctx.world
                torch.distributed.all_gather_object(states, tracker.state_dict())
                tracker.merge(states)
            state.data_failures = tracker.state_dict()
            if ctx.rank == 0 and (note := tracker.fallback_note()):
                console(f"  {note}")
            metrics.update(progress.totals(), step=state.step, epoch=state.epoch, failed_clips=tracker.failed_clips,
                           data_failures=tracker.summary())
            state.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, list))}
            _report(metrics, stage, state, cfg, ctx.rank, tracker, options.run_name)
            log.upload()
        if stop:
            break
        t_fetch = time.perf_counter()
    log.close()


def epoch_end(cfg: PretrainConfig, options: RunOptions, stage: Stage, model: nn.Module, ctx: WorkerContext,
              epoch: int, log_dir: Path | None) -> dict:
    """Stage 2 validates every ``run.val_every`` epochs (and after the last); LP and FT run the
    downstream test protocol once, after the last epoch. Returns the metrics to report."""
    stage_cfg = getattr(cfg, options.stage)
    last = epoch + 1 == stage_cfg.epochs
    out: dict = {}
    if options.stage == "align" and (last or (epoch + 1) % cfg.run.val_every == 0):
        out = validate(model, stage.sources, stage.head_of_source, ctx, stage_cfg.trained_sources())
    elif options.stage in ("lp", "ft") and last:
        out = final_test(model, stage.sources[0], stage.head_of_source[0], ctx,
                         (cfg.eval.test_clips, cfg.eval.test_crops), log_dir)
    if out and isinstance(stage.model, LearnedAverage):
        out["learned_alpha"] = stage.model.alphas().detach().mean(0).tolist()
    return out


def validate(model, sources: list[ResolvedSource], head_of_source: list[str], ctx: WorkerContext,
             trained: set[str]) -> dict:
    """Top-1 per source on its held-out rows (one centre view per video); sources the stage never
    trains on (weight 0 throughout) are skipped."""
    out = {}
    for k, r in enumerate(sources):
        if r.val is None or r.train.name not in trained:
            continue
        res = multiview_test(model, r.val, ctx, head=head_of_source[k], num_clips=1, num_crops=1, batch_size=8)
        out[f"val_top1/{r.train.name}"] = res["top1"]
        out[f"val_failed/{r.train.name}"] = res["failed"]
    top1 = [v for k, v in out.items() if k.startswith("val_top1/")]
    if top1:
        out["val_top1_mean"] = sum(top1) / len(top1)  # one number for schedulers (ASHA)
    if ctx.rank == 0 and out:
        console("  validation: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if "top1" in k))
    return out


def final_test(model, source: ResolvedSource, head: str, ctx: WorkerContext, views: tuple[int, int],
               run_dir: Path | None) -> dict:
    """The downstream testing protocol on the task's test list: clips x crops views per video."""
    res = multiview_test(model, source.val, ctx, head=head, num_clips=views[0], num_crops=views[1])
    if ctx.rank == 0:
        if res["failed"]:
            console(f"  WARNING: {res['failed']} of {res['failed'] + res['videos']} test videos could not be decoded "
                    f"and were excluded (rows {res['failed_rows'][:20]}...)")
            if run_dir is not None:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(run_dir / "test_failed_rows.json", json.dumps(res["failed_rows"]))
        if res["decoded_by_pyav"]:
            console(f"  note: {res['decoded_by_pyav']} test videos decord could not decode were decoded with PyAV "
                    "(data.decode.backend auto)")
        console(f"  test ({views[0]}x{views[1]} views): top-1 {res['top1']:.4f} top-5 {res['top5']:.4f} "
                f"on {res['videos']} videos")
    return {"test_top1": res["top1"], "test_top5": res["top5"], "test_videos": res["videos"], "test_failed": res["failed"]}


def wrap_ddp(model: nn.Module, ctx: WorkerContext) -> nn.Module:
    """DDP across the ranks (the model as it is for one rank). Buffers are not broadcast: ours are
    fixed (positional tables, the frozen trunks of learned averaging: ~0.7 GB a step at K = 2 if
    they were), and a broadcast in forward would hang a rank whose peer has no validation batch."""
    if ctx.world == 1:
        return model
    device_ids = [ctx.device] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def _without_failed(batches, tracker: FailureTracker):
    """``(epoch, i, batch)`` -> ``((epoch, i, loss weight, clips learned from), batch)`` without the
    failed clips (counted on the host). A batch whose clips all failed is kept (DDP needs every rank
    to step) with weight 0: it learns nothing."""
    for epoch, i, batch in batches:
        kept = tracker.update({k: v.numpy() for k, v in batch.items()})
        if len(kept["ok"]) == 0:
            yield (epoch, i, 0.0, 0), batch
        elif len(kept["ok"]) == len(batch["ok"]):
            yield (epoch, i, 1.0, len(kept["ok"])), batch  # the (pinned) tensors as they came
        else:
            yield (epoch, i, 1.0, len(kept["ok"])), {k: torch.from_numpy(v) for k, v in kept.items()}


def _report(metrics: dict, stage: Stage, state: TrainState, cfg: PretrainConfig, rank: int,
            tracker: FailureTracker, run_name: str) -> None:
    """Every rank reports (Ray needs the same number of calls); only rank 0 attaches a checkpoint,
    with the rejected videos so far (``rejects.csv``, ``data_failures.json``).

    ``run.checkpoint_upload: async``: the checkpoint is written to a local staging folder and Ray
    uploads it from a background thread, then deletes the folder; the next steps train meanwhile
    (a ViT-B checkpoint with its optimizer state is about 1 GB). Ray waits for the uploads before the
    run ends, and a checkpoint enters the run record only once uploaded, so a crash mid-upload
    resumes from the one before."""
    if rank != 0:
        ray.train.report(metrics)
        return
    extra = {REJECTS_FILE: tracker.rejects_csv(), FAILURES_FILE: json.dumps(tracker.summary(), indent=2)}
    if cfg.run.checkpoint_upload == "async":
        staging = checkpoint_staging(run_name)
        staging.mkdir(parents=True, exist_ok=True)
        local = tempfile.mkdtemp(prefix=f"step{state.step}-", dir=staging)
        save_checkpoint(local, stage.model, stage.optimizer, asdict(state), to_dict(cfg), extra=extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, stage.model, stage.optimizer, asdict(state), to_dict(cfg), extra=extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def checkpoint_staging(run_name: str) -> Path:
    """Where rank 0 writes the checkpoints that Ray uploads in the background (node-local)."""
    return Path(tempfile.gettempdir()) / "ppma_ray_checkpoints" / run_name


def _log_dirs(cfg: PretrainConfig, run_name: str) -> tuple[Path, tuple | None]:
    """(where this stage's logger files are written, the run folder they are uploaded to or None):
    the run folder itself on local or shared storage; with object storage a node-local folder,
    uploaded next to the checkpoints."""
    if objectstore.is_uri(cfg.run.storage_path):
        fs, base, _ = storage(cfg.run.storage_path)
        return Path(tempfile.gettempdir()) / "ppma_ray_logs" / run_name, (fs, f"{base.rstrip('/')}/{run_name}")
    return Path(cfg.run.storage_path).resolve() / run_name, None


def _load_init(model, init_from: str, strict: bool):
    """Trunk from a weights file, a checkpoint or Hugging Face folder, a Hub id, or a checkpoint URI."""
    if objectstore.is_uri(init_from):
        with open_checkpoint(init_from).as_directory() as d:
            return load_trunk(model, d, strict)
    return load_trunk(model, init_from, strict)


def _fail_once(cfg: PretrainConfig, run_name: str, step: int) -> None:
    """Test hook: fail once at ``run.fail_at_step`` (a marker file makes the retry pass), by raising
    or by the worker's process being killed (``run.fail_mode``)."""
    marker = Path(cfg.run.storage_path).resolve() / run_name / f"failed_at_{step}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        if cfg.run.fail_mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {step} (run.fail_at_step)")
