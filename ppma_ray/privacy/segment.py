"""Person segmenters: any callable ``frames (T, H, W, 3) uint8 -> person probability (T, H, W) float32``.

``TorchvisionSegmenter`` wraps a torchvision semantic-segmentation model (DeepLabV3, trained on the
COCO subset with VOC labels, whose class 15 is "person"). Weights come from torchvision's weights
API (``weights="DEFAULT"`` downloads them once into the torch hub cache; a cluster can pre-populate
that cache) or from a local file (``weights_path``); ``weights=None`` builds an untrained model for
wiring tests. Better segmenters plug in as any callable with the same contract.
"""

from __future__ import annotations

import numpy as np
import torch

from ppma_ray.ray_env import reserved_device

PERSON = 15  # index of "person" in torchvision's COCO_WITH_VOC_LABELS
ARCHS = ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101")


class TorchvisionSegmenter:
    def __init__(self, arch: str = "deeplabv3_mobilenet_v3_large", weights: str | None = "DEFAULT",
                 weights_path: str | None = None, device: str | None = None, batch_size: int = 8,
                 short_side: int = 520):
        from torchvision.models import get_model, get_model_weights

        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        w = None if weights is None or weights_path else get_model_weights(arch)[weights]
        self.model = get_model(arch, weights=w, weights_backbone=None, num_classes=21, aux_loss=None)
        if weights_path:
            from ppma_ray.models.checkpoint import read_state_dict

            # torchvision's DeepLabV3 files also hold the auxiliary training head, which inference
            # never runs; every other tensor must be there and fit: a half-loaded person segmenter
            # would leave people in the videos
            state = {k: v for k, v in read_state_dict(weights_path).items() if not k.startswith("aux_classifier.")}
            result = self.model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"{weights_path} is not a {arch} person segmenter: missing {result.missing_keys[:5]}"
                                 f"{' ...' if len(result.missing_keys) > 5 else ''}, unexpected "
                                 f"{result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}")
        self.device = torch.device(device) if device else reserved_device()  # never a GPU Ray did not assign
        self.model.to(self.device).eval()
        self.batch_size, self.short_side = batch_size, short_side
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)

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


class ColorKeySegmenter:
    """Pixels within ``tolerance`` of ``color`` are "person": the exact mask of a rendered sprite of
    known colour (synthetic test footage)."""

    def __init__(self, color=(255, 0, 255), tolerance: int = 60):
        self.color, self.tolerance = np.asarray(color, dtype=np.int16), tolerance

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        d = np.abs(frames.astype(np.int16) - self.color).max(axis=-1)
        return (d <= self.tolerance).astype(np.float32)
