"""Video RandAugment with pytorchvideo's semantics, the released PPMA recipe's augmentation.

pytorchvideo's ``RandAugment(magnitude=7, num_layers=4, prob=0.5)`` (it no longer imports with
current torchvision) differs from torchvision's ``v2.RandAugment`` in ways that matter (about 3x
stronger at the release's settings):

* ``num_layers`` distinct ops are drawn from 14 (no repeats), and **each** is applied with
  probability ``prob`` on its own (torchvision: all or nothing);
* the magnitude is on a 0-10 scale (torchvision: 31 bins) and jittered per op by a Gaussian of
  std 0.5, clipped to [0, 10];
* signed ops (brightness, contrast, rotation, shear, ...) flip their sign with probability 0.5;
* geometric ops fill with gray (the release's 0.5 on [0, 1] pixels).

One parameter draw per clip is applied to every frame (the clip is one ``(T, C, H, W)`` tensor).
Randomness comes from torch's global generator, as pytorchvideo's, so a seed fixes the draw.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

MAX_LEVEL = 10.0
FILL = 128  # gray on uint8 (the release fills with 0.5 on [0, 1] pixels)
# op -> (value at level 0, change at level 10), pytorchvideo's _TRANSFORM_RANDAUG_MAX_PARAMS
MAX_PARAMS: dict[str, tuple[float, float] | None] = {
    "AdjustBrightness": (1, 0.9), "AdjustContrast": (1, 0.9), "AdjustSaturation": (1, 0.9),
    "AdjustSharpness": (1, 0.9), "AutoContrast": None, "Equalize": None, "Invert": None, "Rotate": (0, 30),
    "Posterize": (4, 4), "Solarize": (1, 1), "ShearX": (0, 0.3), "ShearY": (0, 0.3), "TranslateX": (0, 0.45),
    "TranslateY": (0, 0.45),
}
OPS = tuple(MAX_PARAMS)
DECREASING = {"Posterize", "Solarize"}  # their argument falls as the level rises
UNSIGNED = DECREASING | {"AutoContrast", "Equalize", "Invert"}


def op_argument(name: str, level: float, negate: bool) -> float | None:
    """pytorchvideo's level -> argument mapping for op ``name`` at ``level`` in [0, 10]."""
    params = MAX_PARAMS[name]
    if params is None:
        return None
    base, span = params
    change = level / MAX_LEVEL * span
    if name == "Posterize":
        return base - int(change)  # bits kept
    if name == "Solarize":
        return base - change  # threshold on [0, 1] pixels
    return base + (-change if negate else change)


def apply_op(video: torch.Tensor, name: str, arg: float | None) -> torch.Tensor:
    """One op on a uint8 ``(T, C, H, W)`` clip, every frame alike."""
    h, w = video.shape[-2:]
    bilinear = InterpolationMode.BILINEAR
    if name == "AdjustBrightness":
        return F.adjust_brightness(video, arg)
    if name == "AdjustContrast":
        return F.adjust_contrast(video, arg)
    if name == "AdjustSaturation":
        return F.adjust_saturation(video, arg)
    if name == "AdjustSharpness":
        return F.adjust_sharpness(video, arg)
    if name == "AutoContrast":
        return F.autocontrast(video)
    if name == "Equalize":
        return F.equalize(video)
    if name == "Invert":
        return F.invert(video)
    if name == "Posterize":
        return video if arg >= 8 else F.posterize(video, int(arg))
    if name == "Solarize":
        return F.solarize(video, arg * 255.0)
    if name == "Rotate":
        return F.rotate(video, arg, interpolation=bilinear, fill=FILL)
    # pytorchvideo samples the input at x + f*y + f*H/2 (ShearX): a shear anchored at the top row,
    # which is torchvision's shear about the top-left corner; translations move by f * size
    if name == "ShearX":
        return F.affine(video, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(arg)), 0.0],
                        interpolation=bilinear, fill=FILL, center=[0, 0])
    if name == "ShearY":
        return F.affine(video, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(arg))],
                        interpolation=bilinear, fill=FILL, center=[0, 0])
    if name == "TranslateX":
        return F.affine(video, angle=0.0, translate=[-arg * w, 0], scale=1.0, shear=[0.0, 0.0],
                        interpolation=bilinear, fill=FILL)
    if name == "TranslateY":
        return F.affine(video, angle=0.0, translate=[0, -arg * h], scale=1.0, shear=[0.0, 0.0],
                        interpolation=bilinear, fill=FILL)
    raise ValueError(f"unknown RandAugment op {name!r}")


class VideoRandAugment:
    """``__call__(video)``: uint8 ``(T, C, H, W)`` -> the same shape, ``sample()`` then ``apply``."""

    def __init__(self, magnitude: float = 7, num_layers: int = 4, prob: float = 0.5, sampling_std: float = 0.5):
        if not 0 <= num_layers <= len(OPS):
            raise ValueError(f"num_layers must be in [0, {len(OPS)}], got {num_layers}")
        self.magnitude, self.num_layers, self.prob, self.sampling_std = magnitude, num_layers, prob, sampling_std

    def sample(self) -> list[tuple[str, float | None]]:
        """One clip's draw: the ops to apply, in order, with their arguments (skipped ops absent)."""
        chosen = torch.multinomial(torch.ones(len(OPS)), self.num_layers, replacement=False).tolist()
        ops = []
        for i in chosen:
            if torch.rand(1).item() > self.prob:
                continue
            level = min(MAX_LEVEL, max(0.0, torch.normal(float(self.magnitude), self.sampling_std, size=(1,)).item()))
            name = OPS[i]
            negate = name not in UNSIGNED and torch.rand(1).item() <= 0.5
            ops.append((name, op_argument(name, level, negate)))
        return ops

    @staticmethod
    def apply(video: torch.Tensor, ops: list[tuple[str, float | None]]) -> torch.Tensor:
        for name, arg in ops:
            video = apply_op(video, name, arg)
        return video

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return self.apply(video, self.sample())
