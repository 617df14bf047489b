"""The Ray Train worker loop shared by every stage (one explicit step, torchtitan style).

Per step: uint8 batch -> device -> normalize there -> autocast (bf16 on CUDA, fp32 on CPU) ->
loss -> backward -> grad norm (clipped when configured) -> finite check of loss and grad norm,
agreed by all ranks -> optimizer step. The LR is set every step from the warmup + cosine schedule.
The loop always starts from ``ray.train.get_checkpoint()`` when there is one.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ppma_ray.config import PretrainConfig, from_dict
from ppma_ray.data.pipeline import FailureTracker
from ppma_ray.models import create_model
from ppma_ray.models.checkpoint import load_trunk
from ppma_ray.train.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint, step_seed
from ppma_ray.models.averaging import LearnedAverage, load_trunks
from ppma_ray.train.data import EpochStream, clip_config, decode_resources, resolve_sources
from ppma_ray.train.evaluate import multiview_test
from ppma_ray.train.optim import build_optimizer, lr_at, schedule_lr
from ppma_ray.train.stages import AlignLoss, mae_loss, to_model_input

MAX_SKIPPED_STEPS = 5  # consecutive non-finite steps before the run is stopped


def build_model(cfg: PretrainConfig, stage_name: str, num_classes: dict[str, int] | None = None):
    m = cfg.model
    overrides = {k: v for k, v in {"depth": m.depth, "embed_dim": m.embed_dim, "num_heads": m.num_heads}.items() if v}
    overrides.update(
        img_size=cfg.data.clip.img_size, num_frames=cfg.data.clip.num_frames, patch_size=m.patch_size,
        tubelet_size=m.tubelet_size, drop_path_rate=getattr(cfg, stage_name).drop_path_rate,
    )
    if stage_name == "mae":
        overrides.update(decoder_depth=m.decoder_depth, decoder_embed_dim=m.decoder_embed_dim,
                         decoder_num_heads=m.decoder_num_heads, decoder_style=m.decoder_style,
                         masking=m.masking, mask_ratio=m.mask_ratio)
        return create_model(m.preset, "mae", **overrides)
    return create_model(m.preset, "classifier", num_classes=num_classes, **overrides)


def head_layout(stage, sources) -> tuple[list[str], dict[str, int]]:
    """Which head scores each source, and each head's class count."""
    counts = [int(s.table.column("label").to_numpy().max()) + 1 for s in sources]
    if stage.heads == "shared":
        return ["default"] * len(sources), {"default": max(counts)}
    if stage.heads != "separate":
        raise ValueError(f"heads must be 'separate' or 'shared', got {stage.heads!r}")
    return [s.name for s in sources], {s.name: n for s, n in zip(sources, counts)}


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


def train_loop(loop_config: dict) -> None:
    cfg: PretrainConfig = from_dict(PretrainConfig, loop_config["config"])
    stage_name: str = loop_config["stage"]
    stage = getattr(cfg, stage_name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    device = ray.train.torch.get_device()
    ray.data.DataContext.get_current().enable_progress_bars = False  # our progress line is the readable one
    use_cuda = device.type == "cuda"

    resolved = resolve_sources(cfg.data, stage.source_names())
    sources = [r.train for r in resolved]
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank and every run
    if stage_name == "mae":
        model, loss_fn = build_model(cfg, stage_name), mae_loss
    else:
        head_of_source, num_classes = head_layout(stage, sources)
        model = build_model(cfg, stage_name, num_classes)
        loss_fn = AlignLoss(head_of_source, num_classes, stage.label_smoothing, stage.mixup_alpha,
                            stage.cutmix_alpha, stage.random_erase, device=device)
    model.set_grad_checkpointing(stage.grad_checkpointing)
    model.to(device)

    init_from = loop_config.get("init_from")
    if loop_config.get("average"):  # learned weight averaging of K checkpoints, trained with the LP head
        avg = loop_config["average"]
        model = LearnedAverage(model, load_trunks(avg["checkpoints"]), per_layer=avg.get("per_layer", False)).to(device)
    elif loop_config.get("linear_probe"):
        model.set_linear_probe(True)
    optimizer = build_optimizer(model, stage.optim)

    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "seed": cfg.run.seed, "skipped_steps": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer)
    elif loop_config.get("resume_from"):  # another run's full state (a PBT round continues its donor)
        with ray.train.Checkpoint(loop_config["resume_from"]).as_directory() as d:  # a path or a URI
            state = load_checkpoint(d, model, optimizer)
    elif init_from:
        report = _load_init(getattr(model, "classifier", model), init_from)
        if rank == 0:
            print(f"[{stage_name}] initialised from {init_from}: {report}", flush=True)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)

    clip = clip_config(cfg.data, stage.repeats, stage.randaug_ops, stage.randaug_magnitude)
    resources = decode_resources(cfg.data, loop_config.get("cpu_limit"))
    stream = EpochStream(sources, stage, clip, resources, cfg.run.seed, world, rank)
    tracker = FailureTracker(sources, cfg.data.decode.max_failure_rate)
    total_steps = stage.epochs * stream.steps_per_epoch
    log_dir = _local_dir(cfg, loop_config.get("run_name") or f"{cfg.run.name}-{stage_name}")
    log = MetricsLog(log_dir if rank == 0 else None, stage_name)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else torch.autocast("cpu", enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]

    # the schedules span stage.epochs; ``stop_epoch`` ends this run early (a PBT round)
    end = min(stage.epochs, loop_config.get("stop_epoch") or stage.epochs)
    if state["epoch"] >= end:  # finished before; the driver reads the checkpoint's metrics
        return
    t_start = time.perf_counter()
    clips_done = 0
    window = {"loss": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter(), "clips": 0}
    metrics: dict = {}
    step = state["step"]
    ddp_model.train()
    t_fetch = time.perf_counter()
    for epoch, i, batch in stream.iterate(state["epoch"], state["step_in_epoch"], end):
        batch = {k: v.numpy() for k, v in batch.items()}
        kept = tracker.update(batch)
        weight = 1.0
        if len(kept["ok"]) == 0:  # every clip failed: keep the step (DDP) but learn nothing
            kept, weight = batch, 0.0
        window["wait"] += time.perf_counter() - t_fetch
        if cfg.run.fail_at_step == step and rank == 0:
            _fail_once(cfg, stage_name, step)
        torch.manual_seed(step_seed(cfg.run.seed, rank, step))
        lr = lr_at(step, total_steps, stage.optim)
        schedule_lr(optimizer, lr)
        dev = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in kept.items()}
        with autocast:
            loss, extra = loss_fn(ddp_model, dev)
            loss = loss * weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.optim.clip_grad or math.inf)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if world > 1:  # all ranks must take (or skip) the step together
            flag = finite.float().to(device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag > 0
        if bool(finite):
            optimizer.step()
            state["skipped_steps"] = 0
        else:
            state["skipped_steps"] += 1
            if state["skipped_steps"] > MAX_SKIPPED_STEPS:
                raise FloatingPointError(f"{stage_name}: loss or gradient not finite for {MAX_SKIPPED_STEPS + 1} steps in a row (step {step})")
        step += 1
        clips = len(batch["ok"]) * world
        clips_done += clips
        window["clips"] += clips
        window["loss"] += float(loss.detach()) if bool(finite) else 0.0
        window["n"] += 1
        state.update(step=step, epoch=epoch, step_in_epoch=i + 1)
        if step % cfg.run.log_every == 0 or i + 1 == stream.steps_per_epoch:
            metrics = _log_line(stage_name, window, step, total_steps, epoch, stage.epochs, lr, grad_norm, tracker, extra, rank)
            log.write(step, metrics)
        stop = cfg.run.max_steps is not None and step >= cfg.run.max_steps
        end_of_epoch = i + 1 == stream.steps_per_epoch
        if end_of_epoch:
            state.update(epoch=epoch + 1, step_in_epoch=0)
        if (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0) or end_of_epoch or stop:
            if end_of_epoch and stage_name == "align":
                last = epoch + 1 == stage.epochs
                if loop_config.get("test_views"):  # downstream: the test protocol once, at the end
                    if last:
                        metrics.update(_final_test(ddp_model, resolved, head_of_source, clip, resources, world,
                                                   rank, device, autocast, loop_config["test_views"], log_dir))
                elif last or (epoch + 1) % cfg.run.val_every == 0:
                    metrics.update(_validate(ddp_model, resolved, head_of_source, clip, resources, world, rank, device,
                                             autocast, stage.trained_sources()))
                if isinstance(model, LearnedAverage):
                    metrics["learned_alpha"] = model.alphas().detach().mean(0).tolist()
                ddp_model.train()
                log.write(step, {k: v for k, v in metrics.items() if k.startswith(("val", "test"))})
            wall = time.perf_counter() - t_start
            metrics.update(stage_clips_per_s=clips_done / wall, stage_wall_s=wall, step=step, epoch=state["epoch"],
                           failed_clips=int(tracker.failed.sum()))
            state["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, list))}
            _report(metrics, model, optimizer, state, loop_config["config"], rank)
        if stop:
            break
        t_fetch = time.perf_counter()
    log.close()


def _log_line(stage, w, step, total, epoch, epochs, lr, grad_norm, tracker, extra, rank) -> dict:
    elapsed = time.perf_counter() - w["t0"]
    m = {"loss": w["loss"] / max(1, w["n"]), "lr": lr, "grad_norm": float(grad_norm),
         "clips_per_s": w["clips"] / elapsed, "data_wait_frac": min(1.0, w["wait"] / elapsed),
         "failed_clips": int(tracker.failed.sum()), **extra}
    if rank == 0:
        print(f"[{stage}] epoch {epoch + 1}/{epochs} step {step}/{total} loss {m['loss']:.4f} lr {lr:.2e} "
              f"grad {m['grad_norm']:.2f} {m['clips_per_s']:.1f} clips/s data-wait {m['data_wait_frac']:.0%} "
              f"failed {m['failed_clips']}", flush=True)
    w.update(loss=0.0, n=0, wait=0.0, t0=time.perf_counter(), clips=0)
    return m


def _validate(model, resolved, head_of_source, clip, resources, world, rank, device, autocast, trained) -> dict:
    """Top-1 per source on its held-out rows (one centre view per video); sources the stage never
    trains on (weight 0 throughout) are skipped."""
    out = {}
    for k, r in enumerate(resolved):
        if r.val is None or r.train.name not in trained:
            continue
        res = multiview_test(model, r.val, clip, resources, world, rank, device, autocast,
                             head=head_of_source[k], num_clips=1, num_crops=1, batch_size=8)
        out[f"val_top1/{r.train.name}"] = res["top1"]
        out[f"val_failed/{r.train.name}"] = res["failed"]
    top1 = [v for k, v in out.items() if k.startswith("val_top1/")]
    if top1:
        out["val_top1_mean"] = sum(top1) / len(top1)  # one number for schedulers (ASHA)
    if rank == 0 and out:
        print("  validation: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if "top1" in k), flush=True)
    return out


def _final_test(model, resolved, head_of_source, clip, resources, world, rank, device, autocast, views, run_dir) -> dict:
    """The downstream testing protocol on the (single) task's test list: clips x crops views."""
    r = resolved[0]
    res = multiview_test(model, r.val, clip, resources, world, rank, device, autocast,
                         head=head_of_source[0], num_clips=views[0], num_crops=views[1])
    if rank == 0:
        if res["failed"]:
            print(f"  WARNING: {res['failed']} of {res['failed'] + res['videos']} test videos could not be decoded "
                  f"and were excluded (rows {res['failed_rows'][:20]}...)", flush=True)
            if run_dir is not None:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "test_failed_rows.json").write_text(json.dumps(res["failed_rows"]))
        print(f"  test ({views[0]}x{views[1]} views): top-1 {res['top1']:.4f} top-5 {res['top5']:.4f} "
              f"on {res['videos']} videos", flush=True)
    return {"test_top1": res["top1"], "test_top5": res["top5"], "test_videos": res["videos"], "test_failed": res["failed"]}


def _report(metrics: dict, model, optimizer, state: dict, config: dict, rank: int) -> None:
    """Every rank reports (Ray needs the same number of calls); only rank 0 attaches a checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, optimizer, state, config)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _local_dir(cfg: PretrainConfig, run_name: str) -> Path | None:
    if "://" in cfg.run.storage_path:
        return None  # object storage: metrics still reach Ray through ray.train.report
    return Path(cfg.run.storage_path).resolve() / run_name


def _load_init(model, init_from: str):
    """Trunk from a weights file, a checkpoint directory, or a checkpoint URI (cloud storage)."""
    if init_from.endswith((".safetensors", ".pth", ".pt")):
        return load_trunk(model, init_from)
    if "://" in init_from:
        with ray.train.Checkpoint(init_from).as_directory() as d:
            return load_trunk(model, Path(d) / MODEL_FILE)
    return load_trunk(model, Path(init_from) / MODEL_FILE)


def _fail_once(cfg: PretrainConfig, stage: str, step: int) -> None:
    """Test hook: raise once at ``run.fail_at_step`` (a marker file makes the retry pass)."""
    marker = Path(cfg.run.storage_path).resolve() / f"{cfg.run.name}-{stage}" / f"failed_at_{step}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected failure at step {step} (run.fail_at_step)")

