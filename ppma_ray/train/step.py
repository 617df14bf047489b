"""One training step, the same function for every stage, for Ray Train and for the benchmarks.

Per step: uint8 batch -> device -> (the loss normalizes it there) -> autocast (bf16 on CUDA, fp32
on CPU) -> loss -> backward -> grad norm (clipped when configured) -> finite check of loss and grad
norm, agreed by all ranks -> optimizer step, or a step skipped by every rank together.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
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


@dataclass
class StepResult:
    loss: torch.Tensor  # detached scalar, weighted (0 when the step learned nothing)
    grad_norm: torch.Tensor  # before clipping
    taken: bool  # False: the loss or the gradient was not finite on some rank, nobody stepped
    extra: dict  # the loss function's own metrics (e.g. train_top1)


def train_step(ctx: WorkerContext, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               params: list[torch.Tensor], batch: dict[str, torch.Tensor], lr: float,
               clip_grad: float | None = None, weight: float = 1.0) -> StepResult:
    """One optimizer step on ``batch`` (CPU tensors: video ``(B, T, H, W, C)`` uint8, labels, ...).

    ``weight`` scales the loss: 0 keeps a step whose clips all failed to decode in lockstep with
    the other ranks (DDP) without learning from it. Randomness (masks, drop-path, mixup) comes from
    torch's global generator, which the caller seeds per step.
    """
    schedule_lr(optimizer, lr)
    dev = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
    with ctx.autocast():
        loss, extra = loss_fn(model, dev)
        loss = loss * weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
    finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    if ctx.world > 1:  # all ranks must take (or skip) the step together
        flag = finite.float().to(ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag > 0
    taken = bool(finite)
    if taken:
        optimizer.step()
    return StepResult(loss.detach(), grad_norm.detach(), taken, extra)
