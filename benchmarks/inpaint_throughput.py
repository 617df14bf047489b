"""Human-removal inpainting throughput: frames/s on one core at 432x240 (No-Human Kinetics' size).

    python benchmarks/inpaint_throughput.py [--frames 64]

A textured background, static and panning 2 px/frame, with a person-sized sprite (about 8% of the
frame) walking across; times mask dilation + inpainting only (the segmenter is separate, on GPU).
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np

from ppma_ray.privacy.inpaint import inpaint_video, person_mask


def scene(t_len: int, h: int = 240, w: int = 432, pan: float = 0.0):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w + int(pan * t_len) + 1].astype(np.float64)
    big = np.clip(np.stack([120 + 60 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
                  + rng.normal(0, 3, (h, xx.shape[1], 3)), 0, 255).astype(np.uint8)
    frames = np.stack([big[:, int(pan * t):int(pan * t) + w] for t in range(t_len)])
    prob = np.zeros(frames.shape[:3], dtype=np.float32)
    for t in range(t_len):
        x = 40 + 5 * t % (w - 100)
        prob[t, 60:210, x:x + 55] = 1.0
        frames[t][prob[t] > 0] = (255, 0, 255)
    return frames, prob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    out = {}
    for name, pan in (("static", 0.0), ("panning", 2.0)):
        frames, prob = scene(args.frames, pan=pan)
        t0 = time.perf_counter()
        inpaint_video(frames, person_mask(prob))
        out[name] = args.frames / (time.perf_counter() - t0)
        print(f"{name:8s} 432x240: {out[name]:.1f} frames/s on one core")
    if args.json:
        open(args.json, "w").write(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
