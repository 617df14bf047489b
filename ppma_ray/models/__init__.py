"""Video ViT models: MAE pretraining model, classifier, checkpoint transfer, HF interop, FLOPs.

The torch-free configuration (``ViTConfig``, ``ModelConfig``, ``PRESETS``) is imported eagerly;
the torch modules load on first use, so that reading and checking a run's config stays instant.
"""

from __future__ import annotations

import importlib

from ppma_ray.models.config import PRESETS, ModelConfig, ViTConfig, preset_config, vit_config

__all__ = ["create_model", "build_model", "flops", "PretrainVideoMAE", "VideoClassifier", "ViTConfig", "ModelConfig",
           "VisionTransformer", "PRESETS", "preset_config", "vit_config"]

_LAZY = {"flops": "ppma_ray.models.flop_count", "PretrainVideoMAE": "ppma_ray.models.mae",
         "VideoClassifier": "ppma_ray.models.heads", "VisionTransformer": "ppma_ray.models.vit"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppma_ray.models' has no attribute {name!r}")


def create_model(name: str, kind: str = "mae", num_classes: int | dict[str, int] | None = None, **overrides):
    """Build a model from a preset (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``).

    kind: ``"mae"`` -> ``PretrainVideoMAE``; ``"classifier"`` -> ``VideoClassifier`` (needs
    ``num_classes``: an int for one head, or ``{head_name: classes}`` for one head per source).
    overrides: any ``ViTConfig`` field (``img_size``, ``num_frames``, ``tubelet_size``,
    ``patch_size``, ``depth``, ``embed_dim``, ``num_heads``, ``mask_ratio``, ``masking``, ...).
    """
    return model_from_config(preset_config(name, **overrides), kind, num_classes)


def model_from_config(cfg: ViTConfig, kind: str = "mae", num_classes: int | dict[str, int] | None = None):
    from ppma_ray.models.heads import VideoClassifier
    from ppma_ray.models.mae import PretrainVideoMAE

    if kind == "mae":
        return PretrainVideoMAE(cfg)
    if kind == "classifier":
        if num_classes is None:
            raise ValueError("a classifier needs num_classes")
        if isinstance(num_classes, dict):
            cfg.head_names = tuple(num_classes)
        return VideoClassifier(cfg, num_classes)
    raise ValueError(f"kind must be 'mae' or 'classifier', got {kind!r}")


def build_model(model: ModelConfig, kind: str = "mae", num_classes: int | dict[str, int] | None = None, *,
                img_size: int, num_frames: int, drop_path_rate: float = 0.0):
    """The model of a run's ``model:`` section for the run's clip geometry (``vit_config``)."""
    cfg = vit_config(model, img_size=img_size, num_frames=num_frames, drop_path_rate=drop_path_rate)
    return model_from_config(cfg, kind, num_classes)
