"""Video MAE: masking, decoder, pixel head and the per-channel normalized-pixel loss (PPMA §2)."""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ppma_ray.models.config import ViTConfig
from ppma_ray.models.vit import (Block, VisionTransformer, count_masked, init_weights, run_blocks, sinusoid_table,
                                 visible_index)


def imagenet_stats(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std, each ``(1, 3, 1, 1, 1)`` on ``device``. Made on the host and copied
    without blocking: ``torch.tensor(..., device="cuda")`` copies with a stream synchronize, which,
    done in every step, makes the host wait for the GPU to drain its queue."""
    stats = torch.tensor([IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD], dtype=dtype).view(2, 1, 3, 1, 1, 1)
    stats = stats.to(device, non_blocking=True)
    return stats[0], stats[1]


def random_mask(cfg: ViTConfig, batch: int, device=None, generator: torch.Generator | None = None,
                mask_ratio: float | None = None) -> torch.Tensor:
    """(B, N) bool, True = masked; exactly ``count_masked`` per clip.

    ``cfg.masking == "random"`` masks tokens independently of position (PPMA); ``"tube"`` masks the
    same spatial positions in every temporal slice (VideoMAE).
    """
    t, h, w = cfg.grid
    n_mask = count_masked(cfg, mask_ratio)
    n = h * w if cfg.masking == "tube" else t * h * w
    per_slice = n_mask // t if cfg.masking == "tube" else n_mask
    # ``generator=None`` is not passed on: under torch.compile with a batch size that changed (the
    # epoch's last batch, clips that failed to decode) the batch is symbolic, and ``rand``'s
    # generator overload accepts only concrete sizes (the recompile failed)
    noise = torch.rand(batch, n, device=device, **({"generator": generator} if generator is not None else {}))
    ranks = noise.argsort(dim=1).argsort(dim=1)
    mask = ranks < per_slice
    if cfg.masking == "tube":
        mask = mask[:, None, :].expand(batch, t, n).reshape(batch, t * n)
    return mask


def patchify(video: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """video: (B, C, T, H, W) -> (B, N, t*p*p, C) in token raster order, channel last."""
    b, c, _, _, _ = video.shape
    tt, hh, ww = cfg.grid
    t, p = cfg.tubelet_size, cfg.patch_size
    x = video.reshape(b, c, tt, t, hh, p, ww, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, T', H', W', t, p, p, C
    return x.reshape(b, tt * hh * ww, t * p * p, c)


def normalized_pixel_target(video: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """The MAE target: (B, N, t*p*p*C), channel fastest.

    Undo ImageNet normalization to [0, 1] pixels, then per token and per channel subtract the mean
    and divide over the token's t*p*p pixels by sqrt(unbiased variance + 1e-6) (PPMA), or by
    std + 1e-6 with ``decoder_style="videomae"`` (VideoMAE and transformers, so a VideoMAE-style
    run has transformers' loss). The two differ only on near-flat patches.
    """
    mean, std = imagenet_stats(video.device, video.dtype)
    patches = patchify(video * std + mean, cfg)  # B, N, P, C
    mu = patches.mean(dim=-2, keepdim=True)
    var = patches.var(dim=-2, unbiased=True, keepdim=True)
    scale = var.sqrt() + 1e-6 if cfg.decoder_style == "videomae" else torch.sqrt(var + 1e-6)
    return ((patches - mu) / scale).flatten(2)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the pixel dims, then mean over masked tokens of the whole batch."""
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


class MAEDecoder(nn.Module):
    """Blocks + norm + pixel head over all N tokens; ``head``: decoder width -> t*p*p*C."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.decoder_embed_dim
        self.blocks = nn.ModuleList(Block(d, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.patch_dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D_dec) -> (B, N, t*p*p*C)."""
        return self.head(self.norm(run_blocks(self.blocks, x, self.grad_checkpointing)))


class PretrainVideoMAE(nn.Module):
    """Stage-1 model. ``forward(video, mask=None) -> (loss, pred, mask)``.

    video: (B, C, T, H, W) ImageNet-normalized float; mask: (B, N) bool, True = masked (drawn here
    when None); pred: (B, N, t*p*p*C) for every token (the loss uses the masked ones).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        ppma = cfg.decoder_style == "ppma"
        token_dim = cfg.embed_dim if ppma else cfg.decoder_embed_dim
        self.encoder = VisionTransformer(cfg, global_pool=False)
        # the released PPMA projection (``decoder_embed``) has a bias; VideoMAE's has none
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=ppma)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, token_dim))
        self.register_buffer("decoder_pos_embed", sinusoid_table(cfg.num_patches, token_dim), persistent=False)
        self.decoder = MAEDecoder(cfg)
        self.encoder_to_decoder.apply(init_weights)
        self.decoder.apply(init_weights)
        nn.init.trunc_normal_(self.decoder.head.weight, std=0.02)
        if not ppma:
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # VideoMAE; PPMA keeps zeros

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None):
        b = video.shape[0]
        num_masked = None  # a caller's mask is counted once
        if mask is None:
            mask, num_masked = random_mask(self.cfg, b, device=video.device), count_masked(self.cfg)
        ids = visible_index(mask, num_masked)  # (B, N_vis), shared by the encoder and the decoder
        visible = self.encoder.forward_features(video, ids)  # (B, N_vis, D)
        pred = self.forward_decoder(visible, mask, ids)
        loss = masked_mse(pred, normalized_pixel_target(video, self.cfg), mask)
        return loss, pred, mask

    def forward_decoder(self, visible: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scatter visible tokens back to their positions (``ids``: ``visible_index(mask)``), fill
        the rest with the mask token."""
        b, _, _ = visible.shape
        n = mask.shape[1]
        if self.cfg.decoder_style == "videomae":
            visible = self.encoder_to_decoder(visible)
        full = self.mask_token.to(visible.dtype).expand(b, n, -1)
        full = full.scatter(1, ids[..., None].expand(-1, -1, full.shape[-1]), visible)
        full = full + self.decoder_pos_embed.to(full.dtype)
        if self.cfg.decoder_style == "ppma":
            full = self.encoder_to_decoder(full)
        return self.decoder(full)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable
