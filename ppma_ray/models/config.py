"""Model configuration without torch: the architecture (``ViTConfig``), the presets, and the
``model:`` section of a run (``ModelConfig``: a preset plus overrides of the model's own fields).

``ModelConfig`` is generated from ``ViTConfig``: every architecture field that the run does not
supply itself (clip geometry comes from ``data.clip``, drop-path from the stage, the heads from the
stage's sources) is a ``model.<field>`` key, ``None`` meaning "the preset's value". The preset is
resolved when the section is read, so a saved or printed config shows the values the model used.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from ppma_ray.schema import ConfigError, option

PresetName = Literal["vit_tiny", "vit_small", "vit_base", "vit_large"]


@dataclass
class ViTConfig:
    """Architecture of the trunk (and, for MAE, the decoder). Defaults are PPMA's ViT-B/16."""

    img_size: int = 224
    num_frames: int = 16
    tubelet_size: int = option(2, ge=1, help="frames per tubelet token")
    patch_size: int = option(16, ge=1, help="pixels per token side")
    in_chans: int = 3
    embed_dim: int = option(768, ge=1, help="trunk width")
    depth: int = option(12, ge=1, help="trunk blocks")
    num_heads: int = option(12, ge=1, help="trunk attention heads")
    mlp_ratio: float = option(4.0, gt=0, help="MLP width / embed_dim")
    drop_path_rate: float = 0.0
    # MAE decoder (PPMA: 4 blocks, width 384, 16 heads)
    decoder_embed_dim: int = option(384, ge=1, help="MAE decoder width")
    decoder_depth: int = option(4, ge=1, help="MAE decoder blocks")
    decoder_num_heads: int = option(16, ge=1, help="MAE decoder attention heads")
    mask_ratio: float = option(0.9, ge=0, lt=1, help="MAE: fraction of tokens masked")
    masking: Literal["random", "tube"] = option("random", help="MAE: random (PPMA) or tube (VideoMAE) masking")
    # "ppma": the decoder adds its sinusoid table at encoder width, then projects (with a bias), the
    # mask token has encoder width, and the pixel target divides by sqrt(var + 1e-6) (the released
    # code). "videomae": project (no bias), then add a table at decoder width, target / (std + 1e-6)
    # (VideoMAE / Hugging Face; needed to export a pretraining model to HF, and HF's loss).
    decoder_style: Literal["ppma", "videomae"] = option("ppma", help="MAE decoder layout: the released PPMA code or VideoMAE/HF")
    # classifier
    head_names: tuple[str, ...] = field(default_factory=lambda: ("default",))

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        return self.num_frames // self.tubelet_size, self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Pixels per token: in_chans * t * p * p."""
        return self.in_chans * self.tubelet_size * self.patch_size**2

    def validate(self) -> "ViTConfig":
        """Raises ``ConfigError`` (a ``ValueError``) naming the field that does not fit."""
        if self.num_frames % self.tubelet_size:
            raise ConfigError.at("tubelet_size", f"num_frames {self.num_frames} is not a multiple of tubelet_size {self.tubelet_size}")
        if self.img_size % self.patch_size:
            raise ConfigError.at("patch_size", f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError.at("num_heads", f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError.at("decoder_num_heads", f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                                                      f"decoder_num_heads {self.decoder_num_heads}")
        if self.masking not in ("random", "tube"):
            raise ConfigError.at("masking", f"unknown masking {self.masking!r}")
        if self.decoder_style not in ("ppma", "videomae"):
            raise ConfigError.at("decoder_style", f"unknown decoder_style {self.decoder_style!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError.at("mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head_names"] = list(self.head_names)
        return d


PRESETS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=192, decoder_num_heads=6),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=192, decoder_num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_num_heads=16),
}

# The size fields a preset sets. ``--set model.preset=...`` replaces these (unless they are set on
# the command line too); other model keys of the file (masking, decoder depth, ...) stay.
PRESET_FIELDS = tuple(sorted({k for p in PRESETS.values() for k in p}))


def preset_config(name: str, **overrides) -> ViTConfig:
    """A preset's ``ViTConfig`` with ``overrides`` of any field, validated."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    unknown = set(overrides) - set(ViTConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown model override(s) {sorted(unknown)}")
    if "head_names" in overrides:
        overrides["head_names"] = tuple(overrides["head_names"])
    return replace(ViTConfig(**PRESETS[name]), **overrides).validate()


def vit_config(model: "ModelConfig", **run) -> ViTConfig:
    """The one resolution of a run's model: the preset, the ``model:`` section's fields, then what
    the run supplies (``RUN_FIELDS``: ``img_size``, ``num_frames``, ``drop_path_rate``, ...)."""
    return preset_config(model.preset, **model.arch(), **run)


# Supplied by the run, not by the model section: the clip geometry (data.clip), drop-path (per
# stage), the heads (per stage's sources) and the RGB input.
RUN_FIELDS = ("img_size", "num_frames", "drop_path_rate", "head_names", "in_chans")


def _resolve_preset(self) -> None:
    """Fill every field left ``None`` with the preset's value (the section is read resolved)."""
    if self.preset not in PRESETS:
        raise ConfigError.at("preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")
    preset = ViTConfig(**PRESETS[self.preset])
    for name in self.arch():
        if getattr(self, name) is None:
            setattr(self, name, getattr(preset, name))


def _arch(self) -> dict:
    """The architecture fields (everything but ``preset``), as ``create_model`` overrides."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "preset"}


def _check(self) -> None:
    try:
        preset_config(self.preset, **self.arch())
    except ConfigError as e:
        if e.key in ("tubelet_size", "patch_size"):  # depends on data.clip: checked with the whole config
            return
        raise


def _model_fields() -> list:
    hints = typing.get_type_hints(ViTConfig)
    return [(f.name, typing.Optional[hints[f.name]], option(None, **{k: v for k, v in f.metadata.items()}))
            for f in dataclasses.fields(ViTConfig) if f.name not in RUN_FIELDS]


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("preset", PresetName, option("vit_base", help="architecture preset; the other model keys override it")),
     *_model_fields()],
    namespace={"__post_init__": _resolve_preset, "arch": _arch, "check": _check, "__module__": __name__,
               "__doc__": "``model:``: a preset and overrides of its architecture fields (None: the preset's value)."},
)
