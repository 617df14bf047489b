"""Video inpainting baseline: temporal background propagation, then spatial inpainting.

Masks come from a segmenter's probabilities: thresholded, then dilated with a 3x3 cross kernel
4 times (the HAT pipeline's settings), so soft edges and shadows at the border go too.

Each masked pixel of frame t takes the value the same scene point has in the nearest frame (in time)
where that point is background. When the camera moves, frames are first aligned to frame t with a
global translation tracked on background corners (Lucas-Kanade). Pixels that are never background anywhere in the clip are
filled spatially (OpenCV's Telea inpainting). Pixels outside the mask are never changed.
"""

from __future__ import annotations

import cv2
import numpy as np

CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def person_mask(prob: np.ndarray, threshold: float = 0.5, dilate_iters: int = 4) -> np.ndarray:
    """prob: (T, H, W) float -> (T, H, W) bool, thresholded and dilated."""
    mask = (prob > threshold).astype(np.uint8)
    if dilate_iters:
        mask = np.stack([cv2.dilate(m, CROSS, iterations=dilate_iters) for m in mask])
    return mask.astype(bool)


def estimate_shifts(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(T, 2) translation (dy, dx) of the scene in every frame relative to frame 0.

    Corners on the background (person pixels excluded) are tracked between consecutive frames with
    pyramidal Lucas-Kanade; the median displacement is the camera's, robust to the few tracks that
    land on the moving person or fail."""
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    shifts = np.zeros((len(frames), 2), dtype=np.float64)
    for t in range(1, len(frames)):
        step = np.zeros(2)
        pts = cv2.goodFeaturesToTrack(gray[t - 1], maxCorners=300, qualityLevel=0.01, minDistance=4,
                                      mask=(~mask[t - 1]).astype(np.uint8) * 255)
        if pts is not None and len(pts) >= 4:
            nxt, status, _ = cv2.calcOpticalFlowPyrLK(gray[t - 1], gray[t], pts, None)
            ok = status[:, 0] == 1
            if ok.sum() >= 4:
                d = (nxt[ok] - pts[ok])[:, 0]  # (n, 2) as (dx, dy)
                step = np.median(d, axis=0)[::-1]
        shifts[t] = shifts[t - 1] + step
    return shifts


def _shift(img: np.ndarray, dy: float, dx: float, border) -> np.ndarray:
    h, w = img.shape[:2]
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    interp = cv2.INTER_NEAREST if img.dtype == np.uint8 and img.ndim == 2 else cv2.INTER_LINEAR
    return cv2.warpAffine(img, m, (w, h), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def inpaint_video(frames: np.ndarray, mask: np.ndarray, align: bool = True, min_shift: float = 0.5) -> np.ndarray:
    """frames: (T, H, W, 3) uint8; mask: (T, H, W) bool (True = remove) -> inpainted copy."""
    out = frames.copy()
    t_len = len(frames)
    shifts = estimate_shifts(frames, mask) if align else np.zeros((t_len, 2))
    moving = np.abs(shifts).max() >= min_shift
    for t in range(t_len):
        hole = mask[t].copy()
        if not hole.any():
            continue
        # nearest frames first: t-1, t+1, t-2, t+2, ...
        for s in sorted(range(t_len), key=lambda s: (abs(s - t), s)):
            if s == t or not hole.any():
                continue
            src, valid = frames[s], ~mask[s]
            if moving:  # bring frame s onto frame t's coordinates
                dy, dx = shifts[t] - shifts[s]
                src = _shift(src, dy, dx, (0, 0, 0))
                valid = _shift(valid.astype(np.uint8), dy, dx, 0).astype(bool)
            take = hole & valid
            out[t][take] = src[take]
            hole &= ~take
        if hole.any():  # never seen as background: fill from the surroundings
            out[t] = cv2.inpaint(out[t], hole.astype(np.uint8), 3, cv2.INPAINT_TELEA)
            out[t][~mask[t]] = frames[t][~mask[t]]  # guarantee: outside the mask stays as it was
    return out
