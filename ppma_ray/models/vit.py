"""Video ViT trunk with VideoMAE parameter names and timm's model interface.

Tokens come from a tubelet embedding (a Conv3d's parameters, kernel = stride = t x p x p), get a
fixed 1-D sinusoid table over the flattened (t, h, w) raster, and run through pre-norm blocks. There
is no CLS token.
The trunk can run on a subset of tokens: ``forward_features(x, keep)`` drops the masked tokens
*before* the blocks, which is what makes MAE pretraining cheap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from ppma_ray.models.config import ViTConfig


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sinusoid table of VideoMAE / HF: ``(1, n_position, dim)`` float32."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class PatchEmbed3d(nn.Module):
    """Tubelet embedding: ``(B, C, T, H, W) -> (B, N, D)``, N = T/t * H/p * W/p in (t, h, w) raster.

    The parameters are a Conv3d's (kernel = stride = t x p x p; VideoMAE's names and shapes), but the
    forward is the same product as one matmul over the non-overlapping tubelets: for a 3-D
    convolution cuDNN picks a generic implicit-GEMM kernel that took 2.4 ms for 16 clips of 16x224^2
    on an H200 (with its backward, 12% of an MAE step's GPU time); the matmul takes a fraction of that.
    """

    def __init__(self, cfg: ViTConfig, embed_dim: int):
        super().__init__()
        self.t, self.p = cfg.tubelet_size, cfg.patch_size
        k = (self.t, self.p, self.p)
        self.proj = nn.Conv3d(cfg.in_chans, embed_dim, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, frames, h, w = x.shape
        t, p = self.t, self.p
        x = x.reshape(b, c, frames // t, t, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # B, T', H', W', C, t, p, p: the weight's (C, t, p, p) order
        x = x.reshape(b, -1, c * t * p * p)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's split q/v biases (k has none), through SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` layout, LayerNorm eps 1e-6, GELU MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def init_weights(module: nn.Module) -> None:
    """MAE-style init: xavier-uniform Linear with zero bias, LayerNorm (1, 0), Conv3d as a Linear."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """Video ViT trunk.

    ``global_pool=False`` (MAE encoder): tokens end with ``norm``.
    ``global_pool=True`` (classifier): ``norm`` is Identity; tokens are mean-pooled and the pooled
    vector goes through ``fc_norm``, as in VideoMAE fine-tuning and PPMA stage 2.
    """

    def __init__(self, cfg: ViTConfig, global_pool: bool = False):
        super().__init__()
        self.cfg = cfg
        self.global_pool = global_pool
        self.num_features = self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed3d(cfg, cfg.embed_dim)
        # non-persistent: a fixed table is recomputed from the config, never read from a checkpoint
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_patches, cfg.embed_dim), persistent=False)
        dpr = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # linear, no tensor (meta-safe)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, dpr[i]) for i in range(cfg.depth))
        self.norm = nn.Identity() if global_pool else nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6) if global_pool else None
        self.grad_checkpointing = False
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, T, H, W); keep: (B, N_visible) positions of the tokens to run (``visible_index``
        of a mask), None for all.

        Returns the visible tokens after the last block (and ``norm``): (B, N_visible, D).
        """
        # the residual stream stays in the parameters' dtype (fp32) under bf16 autocast: only the
        # matmuls inside the blocks run in bf16
        x = self.patch_embed(x).to(self.pos_embed.dtype) + self.pos_embed
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, D) -> pooled, normalized feature (B, D)."""
        return self.fc_norm(tokens.mean(dim=1))

    # timm interface -----------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}  # biases and norms are excluded by timm's ndim <= 1 rule

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def visible_index(mask: torch.Tensor, num_masked: int | None = None) -> torch.Tensor:
    """(B, N) bool mask (True = masked, ``num_masked`` per clip) -> (B, N_visible) positions of the
    kept tokens, in order. A gather with these replaces boolean-mask indexing, whose data-dependent
    shape makes the host wait for the device."""
    if num_masked is None:
        num_masked = int(mask[0].sum())
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # kept (0) first, in position order
    return order[:, : mask.shape[1] - num_masked]


def count_masked(cfg: ViTConfig, mask_ratio: float | None = None) -> int:
    """Tokens dropped per clip: floor(ratio * N) (random) or T' * floor(ratio * H'W') (tube)."""
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    t, h, w = cfg.grid
    if cfg.masking == "tube":
        return t * int(math.floor(ratio * h * w))
    return int(math.floor(ratio * t * h * w))
