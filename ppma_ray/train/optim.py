"""AdamW parameter groups and the warmup + cosine learning-rate schedule (set every step)."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from ppma_ray.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, positional tables and the mask token.

    With ``layer_decay`` the groups carry timm's ``lr_scale`` (patch embedding d^(depth+1), block k
    d^(depth-k), the head and ``fc_norm`` 1.0); ``layer_decay_style="release"`` multiplies each by
    d once more, the released PPMA code's multipliers (patch embed d^14, block k d^(13-k), head d
    for ViT-B). ``schedule_lr`` multiplies every group's lr by its ``lr_scale``.

    Fused (one kernel for all parameters, on CUDA and CPU): faster, and its ``found_inf`` input lets
    ``train_step`` skip a non-finite step on the device without waiting for it.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    extra = cfg.layer_decay if cfg.layer_decay and cfg.layer_decay_style == "release" else 1.0
    for g in groups:
        g["lr_scale"] = g.get("lr_scale", 1.0) * extra
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup from 0 to ``lr`` over ``warmup_frac`` of the steps, then cosine to ``min_lr``.

    ``lr_bug_scale`` != 1 reproduces the released code, whose cosine starts at ``lr / scale``.
    """
    warmup = int(round(cfg.warmup_frac * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    start = cfg.lr / cfg.lr_bug_scale
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.min_lr + (start - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
