"""Person segmenters: any callable ``frames (T, H, W, 3) uint8 -> person probability (T, H, W) float32``.

``TorchvisionSegmenter`` wraps a torchvision semantic-segmentation model (DeepLabV3, trained on the
COCO subset with VOC labels, whose class 15 is "person"). ``TorchvisionDetector`` wraps torchvision's
Mask R-CNN, an instance detector trained on COCO detection (class 1 is "person"): another model
family, so an audit by one checks the removal by the other instead of confirming its own output.
Weights come from torchvision's weights API (``weights="DEFAULT"`` downloads them once into the
torch hub cache; a cluster can pre-populate that cache) or from a local file (``weights_path``,
loaded whole or not at all); ``weights=None`` builds an untrained model for wiring tests. Better
segmenters plug in as any callable with the same contract.
"""

from __future__ import annotations

import numpy as np
import torch

from ppma_ray.ray_env import reserved_device

PERSON = 15  # index of "person" in torchvision's COCO_WITH_VOC_LABELS
ARCHS = ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101")
COCO_PERSON = 1  # "person" in torchvision's COCO detection categories
DETECTOR_ARCHS = ("maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn")


def load_whole(model: torch.nn.Module, weights_path: str, arch: str, what: str, skip: tuple[str, ...] = ()) -> None:
    """Load a user's weights file into ``model``: every tensor must be there and fit (except the
    ``skip`` prefixes): a half-loaded person model would leave people in the videos."""
    from ppma_ray.models.checkpoint import read_state_dict

    state = {k: v for k, v in read_state_dict(weights_path).items() if not k.startswith(skip)}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{weights_path} is not a {arch} {what}: missing {result.missing_keys[:5]}"
                         f"{' ...' if len(result.missing_keys) > 5 else ''}, unexpected "
                         f"{result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}")


class TorchvisionSegmenter:
    def __init__(self, arch: str = "deeplabv3_mobilenet_v3_large", weights: str | None = "DEFAULT",
                 weights_path: str | None = None, device: str | None = None, batch_size: int = 8,
                 short_side: int = 520):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from torchvision.models import get_model, get_model_weights

        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        w = None if weights is None or weights_path else get_model_weights(arch)[weights]
        self.model = get_model(arch, weights=w, weights_backbone=None, num_classes=21, aux_loss=None)
        if weights_path:  # torchvision's DeepLabV3 files also hold the auxiliary training head, never run here
            load_whole(self.model, weights_path, arch, "person segmenter", skip=("aux_classifier.",))
        self.device = torch.device(device) if device else reserved_device()  # never a GPU Ray did not assign
        self.model.to(self.device).eval()
        self.batch_size, self.short_side = batch_size, short_side
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """frames: (T, H, W, 3) uint8 -> (T, H, W) float32 softmax probability of "person"."""
        import torch.nn.functional as F

        t, h, w, _ = frames.shape
        out = np.empty((t, h, w), dtype=np.float32)
        scale = self.short_side / min(h, w)
        size = (max(8, round(h * scale)), max(8, round(w * scale)))
        for i in range(0, t, self.batch_size):
            x = torch.from_numpy(frames[i:i + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            logits = self.model((x - self.mean) / self.std)["out"]
            prob = logits.softmax(dim=1)[:, PERSON:PERSON + 1]
            out[i:i + len(x)] = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
        return out


class TorchvisionDetector:
    """Mask R-CNN as a person segmenter: a pixel's person probability is the highest mask
    probability among the person detections that score at least ``min_score``."""

    def __init__(self, arch: str = "maskrcnn_resnet50_fpn_v2", weights: str | None = "DEFAULT",
                 weights_path: str | None = None, device: str | None = None, batch_size: int = 4,
                 min_score: float = 0.5, short_side: int = 800):
        from torchvision.models import get_model, get_model_weights

        if arch not in DETECTOR_ARCHS:
            raise ValueError(f"arch must be one of {DETECTOR_ARCHS}, got {arch!r}")
        w = None if weights is None or weights_path else get_model_weights(arch)[weights]
        # the model resizes its input itself (short side to min_size), and normalises it
        self.model = get_model(arch, weights=w, weights_backbone=None, num_classes=91, min_size=short_side,
                               max_size=round(short_side * 1333 / 800))
        if weights_path:
            load_whole(self.model, weights_path, arch, "person detector")
        self.device = torch.device(device) if device else reserved_device()  # never a GPU Ray did not assign
        self.model.to(self.device).eval()
        self.batch_size, self.min_score = batch_size, min_score

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """frames: (T, H, W, 3) uint8 -> (T, H, W) float32 person probability (0 where no person)."""
        t, h, w, _ = frames.shape
        out = np.zeros((t, h, w), dtype=np.float32)
        for i in range(0, t, self.batch_size):
            x = torch.from_numpy(frames[i:i + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float() / 255
            for j, found in enumerate(self.model(list(x))):
                person = (found["labels"] == COCO_PERSON) & (found["scores"] >= self.min_score)
                if person.any():
                    out[i + j] = found["masks"][person, 0].amax(0).cpu().numpy()
        return out


class ColorKeySegmenter:
    """Pixels within ``tolerance`` of ``color`` are "person": the exact mask of a rendered sprite of
    known colour (synthetic test footage)."""

    def __init__(self, color=(255, 0, 255), tolerance: int = 60):
        self.color, self.tolerance = np.asarray(color, dtype=np.int16), tolerance

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        d = np.abs(frames.astype(np.int16) - self.color).max(axis=-1)
        return (d <= self.tolerance).astype(np.float32)
