"""Video ViT models: MAE pretraining model, classifier, checkpoint transfer, HF interop, FLOPs."""

from __future__ import annotations

from ppma_ray.models.flops import flops
from ppma_ray.models.heads import VideoClassifier
from ppma_ray.models.mae import PretrainVideoMAE
from ppma_ray.models.vit import PRESETS, ViTConfig, VisionTransformer, preset_config

__all__ = ["create_model", "flops", "PretrainVideoMAE", "VideoClassifier", "ViTConfig", "VisionTransformer", "PRESETS"]


def create_model(name: str, kind: str = "mae", num_classes: int | dict[str, int] | None = None, **overrides):
    """Build a model from a preset (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``).

    kind: ``"mae"`` -> ``PretrainVideoMAE``; ``"classifier"`` -> ``VideoClassifier`` (needs
    ``num_classes``: an int for one head, or ``{head_name: classes}`` for one head per source).
    overrides: any ``ViTConfig`` field (``img_size``, ``num_frames``, ``tubelet_size``,
    ``patch_size``, ``depth``, ``embed_dim``, ``num_heads``, ``mask_ratio``, ``masking``, ...).
    """
    cfg = preset_config(name, **overrides)
    if kind == "mae":
        return PretrainVideoMAE(cfg)
    if kind == "classifier":
        if num_classes is None:
            raise ValueError("a classifier needs num_classes")
        if isinstance(num_classes, dict):
            cfg.head_names = tuple(num_classes)
        return VideoClassifier(cfg, num_classes)
    raise ValueError(f"kind must be 'mae' or 'classifier', got {kind!r}")
