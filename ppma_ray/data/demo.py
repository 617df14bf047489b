"""Procedural demo datasets: real mp4 files and PPMA-format manifests, deterministic by seed.

They mirror the benchmark at toy scale (64x64 px, 40 frames at 25 fps) so that the method's ideas
show up in minutes on a CPU:

* ``nohuman`` (like No-Human Kinetics): each class has its own scene (a pattern, a palette and
  objects) with a slow camera pan; the actor was "removed", leaving a blurred, inpainting-like patch
  of background that moves where the actor was. Scene carries the label; there is no human motion to see.
* ``synthetic`` (like SynAPT): a rendered stick figure performs one of six motions on a plain or
  noise background. Motion carries the label; the background does not.
* ``motion`` (downstream, like Diving48): the figure's motion is the label; scenes are random and
  faded into a plain tint, so they look alike across classes.
* ``scene_motion`` (downstream, like UCF101): scene and motion both carry the label (class k
  shows scene k and motion k, 80% of the time; otherwise a random scene).

Every class has 6 members: 0 wave, 1 jump, 2 walk right, 3 walk left, 4 squat, 5 jumping jacks
(and the six scene layouts for the scene classes). File names hold a group id (``g<NN>``): videos
of one group share their scene instance and actor, so group-aware splits can keep them together.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ppma_ray.data.video import write_video

VERSION = 4
SIZE, FRAMES, FPS = 64, 40, 25
NUM_CLASSES = 6
MOTIONS = ("wave", "jump", "walk_right", "walk_left", "squat", "jumping_jacks")
# (dataset, per-class train, per-class val)
LAYOUT = {"nohuman": (32, 8), "synthetic": (48, 8), "motion": (16, 10), "scene_motion": (16, 10)}
GROUP_SIZE = 2  # videos per group (same scene instance and actor)


def _disc_stamp(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, r: float, color) -> None:
    """Paint discs of radius r at float points (ys, xs): every pixel within r of some point."""
    ys, xs = np.asarray(ys, dtype=float), np.asarray(xs, dtype=float)
    if not len(ys):
        return
    h, w, _ = img.shape
    y0, y1 = int(max(0, ys.min() - r - 1)), int(min(h, ys.max() + r + 2))
    x0, x1 = int(max(0, xs.min() - r - 1)), int(min(w, xs.max() + r + 2))
    if y0 >= y1 or x0 >= x1:
        return
    # one (rows, cols, points) distance test instead of a Python loop over the points
    yy, xx = np.arange(y0, y1)[:, None, None], np.arange(x0, x1)[None, :, None]
    hit = ((yy - ys) ** 2 + (xx - xs) ** 2 <= r * r).any(axis=-1)
    img[y0:y1, x0:x1][hit] = color


def _segment_points(a, b, step: float = 0.7):
    n = max(2, int(math.hypot(b[0] - a[0], b[1] - a[1]) / step) + 1)
    t = np.linspace(0, 1, n)
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def figure_pose(motion: int, t: int, phase: float, x0: float) -> tuple[dict, float, float]:
    """Joint angles (radians from straight down) and the hip position at frame t."""
    w = 2 * math.pi * t / 16 + phase  # one cycle per 16 frames
    s = math.sin(w)
    pose = {"arm_l": 0.35, "arm_r": -0.35, "leg_l": 0.15, "leg_r": -0.15, "knee": 0.0}
    cx, cy = x0, 38.0
    if motion == 0:  # wave: right arm raised, swinging wide
        pose["arm_r"] = -(2.2 + 0.8 * s)
    elif motion == 1:  # jump
        cy -= 12 * abs(s)
        pose["leg_l"], pose["leg_r"] = 0.05, -0.05
    elif motion in (2, 3):  # walk: translate and swing the legs and arms
        d = 1 if motion == 2 else -1
        cx += d * 1.1 * t
        pose["leg_l"], pose["leg_r"] = 0.6 * s, -0.6 * s
        pose["arm_l"], pose["arm_r"] = -0.5 * s, 0.5 * s
    elif motion == 4:  # squat: hips go down, knees bend
        depth = (1 - math.cos(w)) / 2
        cy += 10 * depth
        pose["knee"] = 1.4 * depth
    elif motion == 5:  # jumping jacks: arms and legs open and close
        o = (1 + s) / 2
        pose["arm_l"], pose["arm_r"] = 0.3 + 2.4 * o, -(0.3 + 2.4 * o)
        pose["leg_l"], pose["leg_r"] = 0.1 + 0.45 * o, -(0.1 + 0.45 * o)
    return pose, cx, cy


def draw_figure(img: np.ndarray, motion: int, t: int, phase: float, x0: float, color, thick: float) -> tuple[float, float]:
    """Draw the stick figure in place; returns the hip position."""
    pose, cx, cy = figure_pose(motion, t, phase, x0)
    neck = (cy - 15, cx)
    pts_y, pts_x = [], []

    def limb(start, angle, length, knee=0.0):
        mid = (start[0] + length / 2 * math.cos(angle), start[1] + length / 2 * math.sin(angle))
        a2 = angle + knee * (1 if angle >= 0 else -1)
        end = (mid[0] + length / 2 * math.cos(a2), mid[1] + length / 2 * math.sin(a2))
        for a, b in ((start, mid), (mid, end)):
            ys, xs = _segment_points(a, b)
            pts_y.extend(ys), pts_x.extend(xs)

    ys, xs = _segment_points((cy, cx), neck)
    pts_y.extend(ys), pts_x.extend(xs)
    limb(neck, pose["arm_l"], 13)
    limb(neck, pose["arm_r"], 13)
    limb((cy, cx), pose["leg_l"], 16, pose["knee"])
    limb((cy, cx), pose["leg_r"], 16, pose["knee"])
    _disc_stamp(img, np.array(pts_y), np.array(pts_x), thick, color)
    _disc_stamp(img, np.array([cy - 20]), np.array([cx]), 5.0, color)
    return cx, cy


def scene(layout: int, rng: np.random.Generator, size: int = SIZE + 16) -> np.ndarray:
    """A background ``(size, size, 3)`` uint8 (larger than a frame, for the camera pan).

    Smooth sinusoidal patterns and flat objects, without per-pixel noise: MAE's target is each
    patch's pixels normalized by the patch's own std, which turns white noise on a near-flat patch
    into an unpredictable target, and with the noise (std 6) stage 1 of the demo stayed at a loss
    of 0.98 (1.0 is predicting each patch's mean).
    """
    hue = (layout / NUM_CLASSES + rng.normal(0, 0.02)) % 1.0
    base = np.array(_hsv(hue, 0.45, 0.75))
    alt = np.array(_hsv((hue + 0.5) % 1.0, 0.6, 0.45))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(10, 14)

    def wave(u):
        return np.sin(u / period * 2 * math.pi)

    radius = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) ** 0.5
    patterns = [
        wave(yy),  # horizontal stripes
        wave(xx),  # vertical stripes
        wave(yy) * wave(xx),  # checker
        wave(xx + yy),  # diagonal
        wave(radius + period / 4),  # rings
        -np.ones((size, size)),  # plain with objects only
    ]
    img = base + (0.5 + 0.5 * patterns[layout][..., None]) * (alt - base)
    for _ in range(3 + layout % 3):  # class-typical objects: squares in a class-typical region
        y, x = rng.integers(0, size - 12, size=2)
        y = (y // 3 + layout * 9) % (size - 12)
        img[y:y + 10, x:x + 10] = _hsv((hue + 0.25) % 1.0, 0.8, 0.9)
    return np.clip(img, 0, 255).astype(np.uint8)


def box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """``(H, W, C)`` -> float ``(H, W, C)``: the mean over a (2r+1)^2 box, edges repeated."""
    out = img.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis)
        out = (np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis) - np.take(c, np.arange(n), axis=axis)) / (2 * r + 1)
    return out


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (255 * r, 255 * g, 255 * b)


def render(kind: str, label: int, rng: np.random.Generator) -> np.ndarray:
    """One demo video ``(FRAMES, SIZE, SIZE, 3)`` uint8."""
    if kind == "synthetic":  # rendered: a plain backdrop with a little texture, the scene says nothing
        tint = rng.integers(0, 120, size=3)
        bg = np.clip(tint + rng.normal(0, 8, size=(SIZE + 16, SIZE + 16, 3)), 0, 255).astype(np.uint8)
    else:
        layout = label if kind == "nohuman" or (kind == "scene_motion" and rng.random() < 0.8) else int(rng.integers(NUM_CLASSES))
        bg = scene(layout, rng)
        if kind == "motion":  # like Diving48: similar, low-contrast settings; the scene says nothing
            tint = rng.integers(0, 120, size=3)
            bg = (0.3 * bg + 0.7 * tint).astype(np.uint8)
    motion = int(rng.integers(NUM_CLASSES)) if kind == "nohuman" else label
    color = _hsv(rng.random(), 0.7, 1.0)  # bright figure
    phase, thick = rng.uniform(0, 2 * math.pi), rng.uniform(2.0, 2.8)
    x0 = {2: 12.0, 3: 52.0}.get(motion, rng.uniform(24, 40))
    pan = rng.uniform(-0.2, 0.2, size=2)
    frames = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    for t in range(FRAMES):
        oy, ox = (8 + pan * t).round().astype(int).clip(0, 16)
        frame = bg[oy:oy + SIZE, ox:ox + SIZE].copy()
        if kind == "nohuman":  # the actor was inpainted away: a blurred patch of background follows its path
            _, cx, cy = figure_pose(motion, t, phase, x0)
            y0, y1, x_0, x_1 = max(0, int(cy) - 22), min(SIZE, int(cy) + 14), max(0, int(cx) - 8), min(SIZE, int(cx) + 8)
            if y0 < y1 and x_0 < x_1:
                frame[y0:y1, x_0:x_1] = box_blur(frame, 6)[y0:y1, x_0:x_1].round().astype(np.uint8)
        else:
            draw_figure(frame, motion, t, phase, x0, color, thick)
        frames[t] = frame
    return frames


def _job(args) -> tuple[str, int]:
    root, kind, split, idx, label, seed = args
    rng = np.random.default_rng([seed, list(LAYOUT).index(kind), split == "val", idx // GROUP_SIZE])
    rng = np.random.default_rng([int(rng.integers(2**62)), idx % GROUP_SIZE])
    rel = f"{kind}/{split}/c{label}_g{idx // GROUP_SIZE:03d}_v{idx % GROUP_SIZE}.mp4"
    write_video(Path(root) / rel, render(kind, label, rng), fps=FPS, crf=18)
    return rel, label


def make_demo(root: str | Path, seed: int = 0, workers: int = 2) -> dict[str, dict[str, Path]]:
    """Write the demo datasets under ``root`` (once; reused when the same seed is there already).

    Returns ``{dataset: {"train": manifest, "val": manifest}}``; manifests are ``path;label``.
    """
    root = Path(root)
    stamp = root / "demo.json"
    manifests = {k: {s: root / k / f"{s}.csv" for s in ("train", "val")} for k in LAYOUT}
    if stamp.is_file() and json.loads(stamp.read_text()) == {"version": VERSION, "seed": seed}:
        return manifests
    jobs = []
    for kind, (n_train, n_val) in LAYOUT.items():
        for split, n in (("train", n_train), ("val", n_val)):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
            # group g holds GROUP_SIZE consecutive videos of one class
            for idx in range(n * NUM_CLASSES):
                jobs.append((str(root), kind, split, idx, (idx // GROUP_SIZE) % NUM_CLASSES, seed))
    # Fresh processes, not forks of this one: a caller that has started Ray (or any other threads)
    # would fork them mid-flight, which can deadlock a child (Python 3.12+ warns; 3.14 stopped
    # forking by default). Starting them costs about a second in all.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_job, jobs, chunksize=16))
    lines: dict[tuple[str, str], list[str]] = {}
    for (root_s, kind, split, *_), (rel, label) in zip(jobs, results):
        lines.setdefault((kind, split), []).append(f"{Path(rel).relative_to(kind)};{label}\n")
    for (kind, split), ls in lines.items():
        manifests[kind][split].write_text("".join(ls))
    stamp.write_text(json.dumps({"version": VERSION, "seed": seed}))
    return manifests
