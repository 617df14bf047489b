"""What one step computes in each stage, given a device batch of uint8 clips.

Clips arrive as uint8 ``(B, T, H, W, C)``; ``to_model_input`` turns them into the model's
ImageNet-normalized float ``(B, C, T, H, W)`` on the device, so the host->device copy is 4x smaller
than a float one and the CPU never normalizes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing
from torchvision import tv_tensors
from torchvision.transforms import v2

from ppma_ray.models.mae import imagenet_stats


def to_model_input(video: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """video: (B, T, H, W, C) uint8 -> (B, C, T, H, W) normalized float."""
    x = video.permute(0, 4, 1, 2, 3).to(dtype).div_(255.0)
    mean, std = imagenet_stats(x.device, dtype)
    return (x - mean) / std


def mae_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    loss, _, _ = model(to_model_input(batch["video"]))
    return loss, {}


class AlignLoss:
    """Stage-2 (and fine-tuning) objective: soft-target cross-entropy per source head.

    ``head_of_source[k]`` names the head that source k's clips are scored with (one per source, or
    one shared head). Mixup/CutMix mix only clips of the same source (their labels live in one
    label space); label smoothing is applied to the (mixed) one-hot targets. Random erasing erases
    one box through all frames of a clip, filled with per-pixel noise (timm, ``mode="pixel"``),
    before Mixup/CutMix as in the released code.
    """

    def __init__(self, head_of_source: list[str], num_classes: dict[str, int], label_smoothing: float = 0.0,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, random_erase: float = 0.0, device="cpu"):
        self.head_of_source, self.num_classes, self.smoothing = head_of_source, num_classes, label_smoothing
        self.mix = {}
        for name, n in num_classes.items():
            choices = []
            if mixup_alpha > 0:
                choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=n))
            if cutmix_alpha > 0:
                choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=n))
            self.mix[name] = v2.RandomChoice(choices) if choices else None
        self.erase = RandomErasing(random_erase, mode="pixel", device=device) if random_erase > 0 else None

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        x = to_model_input(batch["video"])  # (B, C, T, H, W)
        if self.erase is not None:  # per clip, before mixing (the release's order); one box through
            b, c, t, h, w = x.shape  # all frames: erase on (B, C*T, H, W)
            x = self.erase(x.reshape(b, c * t, h, w)).reshape(b, c, t, h, w)
        labels = batch["label"]
        # grouping by source is host bookkeeping: the column stays on the host (WorkerContext.to_device),
        # so no device value is read back to find the groups
        sources = batch["source"].numpy()
        targets = []
        for k in np.unique(sources):
            rows = np.flatnonzero(sources == k)
            idx = torch.from_numpy(rows).to(x.device, non_blocking=True)
            head = self.head_of_source[int(k)]
            xs, ys = x[idx], labels[idx]
            if self.mix[head] is not None and len(rows) > 1:
                video, ys = self.mix[head](tv_tensors.Video(xs.transpose(1, 2)), ys)
                xs = video.as_subclass(torch.Tensor).transpose(1, 2)
            else:
                ys = F.one_hot(ys, self.num_classes[head]).to(x.dtype)
            x[idx] = xs
            targets.append((idx, head, ys * (1 - self.smoothing) + self.smoothing / self.num_classes[head]))
        logits = model(x, head="all")
        loss = sum(0.0 * out.sum() for out in logits.values())  # every head in the graph (DDP)
        correct = torch.zeros((), device=x.device)
        for idx, head, soft in targets:
            out = logits[head][idx]
            loss = loss + torch.sum(-soft * F.log_softmax(out.float(), dim=-1)) / len(labels)
            correct = correct + (out.argmax(-1) == soft.argmax(-1)).sum()
        return loss, {"train_top1": correct / max(1, len(labels))}
