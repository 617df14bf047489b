"""Classifier: the trunk, mean-pool -> ``fc_norm`` -> one Linear head per label space.

Stage 2 trains one head per source by default (no-human and synthetic classes are unrelated);
``head_names=("default",)`` gives the single shared head of the released code and of downstream
tasks. In linear-probe mode the trunk (``fc_norm`` included) is frozen and kept in eval mode, so
drop-path is off and nothing but the heads changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ppma_ray.models.config import ViTConfig
from ppma_ray.models.vit import VisionTransformer


class VideoClassifier(VisionTransformer):
    """``forward(video, head=None) -> logits (B, num_classes)``; video: (B, C, T, H, W).

    ``head="all"`` returns ``{name: logits}`` for every head from one trunk pass (stage 2 with
    per-source heads, so that DDP sees every head take part in each step)."""

    def __init__(self, cfg: ViTConfig, num_classes: int | dict[str, int]):
        super().__init__(cfg, global_pool=True)
        if isinstance(num_classes, int):
            num_classes = {name: num_classes for name in cfg.head_names}
        self.num_classes = dict(num_classes)
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.embed_dim, n) for name, n in self.num_classes.items()})
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=0.01)  # PPMA §4.1
            nn.init.zeros_(head.bias)
        self.linear_probe, self.trunk_drop_path = False, False

    @property
    def default_head(self) -> str:
        return next(iter(self.heads))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, head: str | None = None):
        """x: tokens (B, N, D) -> logits (B, C), or the pooled feature (B, D) with ``pre_logits``."""
        return self._heads(self.pool(x), pre_logits, head)

    def _heads(self, feat: torch.Tensor, pre_logits: bool, head: str | None):
        if pre_logits:
            return feat
        if head == "all":
            return {name: h(feat) for name, h in self.heads.items()}
        return self.heads[head or self.default_head](feat)

    def forward(self, video: torch.Tensor, head: str | None = None):
        if self.linear_probe:
            with torch.no_grad():
                feat = self.pool(self.forward_features(video))
            return self._heads(feat, False, head)
        return self.forward_head(self.forward_features(video), head=head)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """The pooled, normalized feature the heads see: (B, D)."""
        return self.forward_head(self.forward_features(video), pre_logits=True)

    def set_linear_probe(self, enable: bool = True, trunk_drop_path: bool = False) -> None:
        """Freeze every trunk parameter (heads stay trainable) and keep the trunk in eval mode, so
        no drop-path on frozen weights; ``trunk_drop_path`` keeps drop-path active in training, as
        the released LP does (the trunk has no other train-mode layer)."""
        self.linear_probe, self.trunk_drop_path = enable, trunk_drop_path
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("heads.") or not enable)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.linear_probe and not (mode and self.trunk_drop_path):
            for name, module in self.named_children():
                if name != "heads":
                    module.eval()
        return self

    def get_classifier(self) -> nn.Module:
        return self.heads[self.default_head]

    def reset_classifier(self, num_classes: int, head: str | None = None) -> None:
        name = head or self.default_head
        self.heads[name] = nn.Linear(self.embed_dim, num_classes)
        nn.init.normal_(self.heads[name].weight, std=0.01)
        nn.init.zeros_(self.heads[name].bias)
        self.num_classes[name] = num_classes
