"""Analytic forward FLOPs per clip (a multiply-add counts as 2), for throughput and MFU figures."""

from __future__ import annotations

from torch import nn

from ppma_ray.models.config import ViTConfig
from ppma_ray.models.vit import count_masked


def block_flops(n: int, d: int, mlp_ratio: float) -> int:
    """One transformer block on n tokens of width d: qkv + proj + MLP matmuls, QK^T and AV."""
    linear = 2 * n * d * (3 * d + d + 2 * int(d * mlp_ratio))
    attention = 2 * 2 * n * n * d
    return linear + attention


def flops(model_or_config: nn.Module | ViTConfig, mask_ratio: float | None = None, num_classes: int = 0) -> int:
    """Forward FLOPs of one clip.

    With ``mask_ratio`` (or for an MAE model, its configured ratio) this is the MAE forward:
    tubelet embedding of all tokens, encoder on the visible tokens, decoder on all of them.
    Otherwise the classifier forward on all tokens (plus the head when ``num_classes``).
    """
    from ppma_ray.models.mae import PretrainVideoMAE

    cfg = model_or_config if isinstance(model_or_config, ViTConfig) else model_or_config.cfg
    if isinstance(model_or_config, PretrainVideoMAE) and mask_ratio is None:
        mask_ratio = cfg.mask_ratio
    if not num_classes and hasattr(model_or_config, "num_classes"):
        num_classes = sum(model_or_config.num_classes.values())
    n, d = cfg.num_patches, cfg.embed_dim
    total = 2 * n * cfg.patch_dim * d  # tubelet embedding, every token
    if mask_ratio is None:
        total += cfg.depth * block_flops(n, d, cfg.mlp_ratio) + 2 * d * num_classes
        return int(total)
    visible = n - count_masked(cfg, mask_ratio)
    dd = cfg.decoder_embed_dim
    total += cfg.depth * block_flops(visible, d, cfg.mlp_ratio)
    total += 2 * n * d * dd  # encoder -> decoder projection (PPMA projects all N tokens)
    total += cfg.decoder_depth * block_flops(n, dd, cfg.mlp_ratio)
    total += 2 * n * dd * cfg.patch_dim  # pixel head
    return int(total)
