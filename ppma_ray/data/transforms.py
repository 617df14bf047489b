"""Video augmentation with ``torchvision.transforms.v2`` on uint8 clips (CPU side).

Clips enter and leave as ``(T, H, W, C)`` uint8; one set of random parameters is drawn per clip
and applied to all of its frames (a ``tv_tensors.Video`` is transformed as one unit). Conversion to
float and ImageNet normalization happen on the training device, not here.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ppma_ray.data.config import ClipConfig
from ppma_ray.data.randaug import VideoRandAugment


# PPMA §2.5: RandomResizedCrop with torchvision's default scale and ratio; RandAugment (stage 2 /
# fine-tuning) with pytorchvideo's semantics, each op applied with probability 0.5 (``randaug.py``).
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
RANDAUG_PROB = 0.5


def _to_video(clip: np.ndarray) -> tv_tensors.Video:
    """(T, H, W, C) uint8 numpy -> (T, C, H, W) Video."""
    return tv_tensors.Video(torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2))


def _to_numpy(video: torch.Tensor) -> np.ndarray:
    return video.permute(0, 2, 3, 1).contiguous().numpy()


class TrainTransform:
    """Random-crop augmentation: ``__call__(clip, seed=None) -> (T, crop, crop, C)`` uint8.

    Split in two for repeated augmentation: ``resize`` (short side to ``clip.short_side``,
    deterministic) once per decoded clip, then ``augment`` (crop, flip, RandAugment) per replica.
    Resize draws no randomness, so the split gives exactly the pixels of one composed transform.
    """

    def __init__(self, clip: ClipConfig, randaug_ops: int = 0, randaug_magnitude: float = 7):
        self._resize = v2.Resize(clip.short_side, antialias=True)
        steps = [v2.RandomResizedCrop(clip.img_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True)]
        if clip.flip:
            steps.append(v2.RandomHorizontalFlip())
        if randaug_ops:
            steps.append(VideoRandAugment(randaug_magnitude, randaug_ops, prob=RANDAUG_PROB))
        self._augment = v2.Compose(steps)

    def resize(self, clip: np.ndarray) -> tv_tensors.Video:
        """(T, H, W, C) uint8 -> (T, C, h, w) Video with the short side at ``short_side``."""
        return self._resize(_to_video(clip))

    def augment(self, video: tv_tensors.Video, seed: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """One replica of a resized clip -> ``(T, crop, crop, C)`` uint8 (written into ``out`` if given)."""
        if seed is None:
            result = self._augment(video)
        else:
            with torch.random.fork_rng(devices=[]):  # v2 draws from torch's global generator
                torch.manual_seed(seed)
                result = self._augment(video)
        if out is None:
            return _to_numpy(result)
        out[...] = result.permute(0, 2, 3, 1).numpy()
        return out

    def __call__(self, clip: np.ndarray, seed: int | None = None) -> np.ndarray:
        return self.augment(self.resize(clip), seed)


class EvalTransform:
    """Test-time views: short side -> ``crop_size``, then 3 crops (left/top, center, right/bottom)
    along the long side: ``(T, H, W, C) -> (3, T, crop, crop, C)`` uint8."""

    def __init__(self, crop_size: int = 224, num_crops: int = 3):
        self.crop_size, self.num_crops = crop_size, num_crops
        self.resize = v2.Resize(crop_size, antialias=True)

    def __call__(self, clip: np.ndarray) -> np.ndarray:
        video = self.resize(_to_video(clip))
        h, w = video.shape[-2:]
        s = self.crop_size
        offsets = np.linspace(0, max(h, w) - s, self.num_crops).round().astype(int) if self.num_crops > 1 else [(max(h, w) - s) // 2]
        crops = []
        for o in offsets:
            top, left = (o, (w - s) // 2) if h > w else ((h - s) // 2, o)
            crops.append(_to_numpy(v2.functional.crop(video, int(top), int(left), s, s)))
        return np.stack(crops)
