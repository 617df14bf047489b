"""One training step, the same function for every stage, for Ray Train and for the benchmarks.

Per step: uint8 batch -> device -> (the loss normalizes it there) -> autocast (bf16 on CUDA, fp32
on CPU) -> loss -> backward -> grad norm (clipped when configured) -> finite check of loss and grad
norm, agreed by all ranks -> optimizer step, or a step skipped by every rank together.

The step never waits for the device: the finite check stays a device tensor, all-reduced on the
device, and reaches the fused AdamW kernel as its ``found_inf`` flag (the mechanism GradScaler
uses), which leaves weights, moments and the step count untouched when it is set. Loss, grad norm
and the taken flag come back as device tensors; the caller reads them at log steps only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ppma_ray.data.config import ClipConfig, DecodeConfig
from ppma_ray.train.optim import schedule_lr

LossFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict]"]


@dataclass
class WorkerContext:
    """Where a worker runs and what its input looks like (passed instead of long argument lists)."""

    rank: int
    world: int
    device: torch.device
    clip: ClipConfig
    decode: DecodeConfig  # cpu_limit resolved: Ray Data's share of the cluster

    def autocast(self):
        """bf16 autocast on CUDA (no GradScaler needed); plain fp32 on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors the model reads (``video``, ``label``) on the device, copied from pinned
        memory without blocking on CUDA; the bookkeeping columns (source, row, slot, ok) stay on the
        host, where the loss groups by source without a device round trip."""
        if self.device.type != "cuda":
            return dict(batch)
        out = dict(batch)
        for key in DEVICE_KEYS:
            if key in batch and batch[key].device.type == "cpu":
                host = batch[key] if batch[key].is_pinned() else batch[key].pin_memory()
                out[key] = host.to(self.device, non_blocking=True)
        return out


DEVICE_KEYS = ("video", "label")


def prefetch_to_device(ctx: WorkerContext, items):
    """``(meta, host_batch)`` items -> ``(meta, device_batch)``, with the *next* batch's copy issued
    on a side CUDA stream while the current step runs (input/compute overlap). On CPU: as they come."""
    if ctx.device.type != "cuda":
        yield from items
        return
    side = torch.cuda.Stream(ctx.device)
    pending = None
    for meta, batch in items:
        with torch.cuda.stream(side):
            staged = ctx.to_device(batch)
        if pending is not None:
            yield pending
        compute = torch.cuda.current_stream(ctx.device)
        compute.wait_stream(side)
        for key in DEVICE_KEYS:  # used on the compute stream: keep the memory alive until it is done
            if key in staged and staged[key].is_cuda:
                staged[key].record_stream(compute)
        pending = (meta, staged)
    if pending is not None:
        yield pending


@dataclass
class StepResult:
    """Device tensors (reading one waits for the step to finish: do it at log steps)."""

    loss: torch.Tensor  # detached scalar, weighted (0 when the step learned nothing)
    grad_norm: torch.Tensor  # before clipping
    taken: torch.Tensor  # bool scalar; False: the loss or the gradient was not finite on some rank, nobody stepped
    extra: dict = field(default_factory=dict)  # the loss function's own metrics (e.g. train_top1), tensors


def train_step(ctx: WorkerContext, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               params: list[torch.Tensor], batch: dict[str, torch.Tensor], lr: float,
               clip_grad: float | None = None, weight: float = 1.0, accum_steps: int = 1) -> StepResult:
    """One optimizer step on ``batch`` (CPU tensors: video ``(B, T, H, W, C)`` uint8, labels, ...).

    ``batch`` may already be on the device (``prefetch_to_device``); ``weight`` scales the loss: 0
    keeps a step whose clips all failed to decode in lockstep with the other ranks (DDP) without
    learning from it. Randomness (masks, drop-path, mixup) comes from torch's global generator,
    which the caller seeds per step. ``optimizer`` must be fused AdamW (``build_optimizer``): its
    ``found_inf`` flag is how the step is skipped without a host sync.

    ``accum_steps``: the batch is split into that many micro-batches, each forward and backward on
    its own (1/accum_steps of the activations), their gradients summed, with DDP's all-reduce on
    the last one only (``no_sync`` before), then one optimizer step. Both losses average over clips
    and each micro-batch's loss counts by its share of the clips, so this is the gradient of the
    whole batch, also when failed clips made it smaller or uneven (mixup/cutmix mix within a
    micro-batch, and masks are drawn per micro-batch).
    """
    schedule_lr(optimizer, lr)
    dev = ctx.to_device(batch)
    micro = _split(dev, accum_steps)
    n = sum(len(part["video"]) for part in micro)
    optimizer.zero_grad(set_to_none=True)
    total, extras = None, []
    for i, part in enumerate(micro):
        share = len(part["video"]) / n
        last = i == len(micro) - 1  # the one backward that all-reduces (ranks may split differently)
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with ctx.autocast():
                loss, extra = loss_fn(model, part)
                loss = loss * (weight * share)
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
        extras.append({k: v * share for k, v in extra.items()})
    extra = {k: sum(e[k] for e in extras) for k in extras[0]}
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
    finite = (torch.isfinite(total) & torch.isfinite(grad_norm)).float()
    if ctx.world > 1:  # all ranks must take (or skip) the step together
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    optimizer.found_inf = 1.0 - finite  # read by the fused kernel on the device: 1 = skip this step
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None
    return StepResult(total, grad_norm.detach(), finite > 0, extra)


def _split(batch: dict, parts: int) -> list[dict]:
    """Up to ``parts`` micro-batches of every per-clip column, as equal as the clips allow (a batch
    that lost clips to decode failures may be uneven or hold fewer clips than ``parts``)."""
    n = len(batch["video"])
    parts = max(1, min(parts, n))
    if parts == 1:
        return [batch]
    columns = {k: v.tensor_split(parts) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim and len(v) == n}
    return [{**batch, **{k: chunks[i] for k, chunks in columns.items()}} for i in range(parts)]
