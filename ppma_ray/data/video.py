"""Clip sampling and decoding: video files through decord, frame folders at an explicit fps.

A clip is a random ``clip_seconds`` window, uniformly subsampled to ``num_frames`` frames (frames
repeat when the window holds fewer). Only the sampled frames are decoded. Everything returns
``numpy.uint8`` arrays shaped ``(T, H, W, C)``; conversion to float happens on the training device.

Every failure (missing, empty, truncated or undecodable file, a gap in a frame folder) raises
``VideoDecodeError`` naming the file, so callers can count and report it instead of crashing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

# decord's bundled FFmpeg prints every demuxer complaint to stderr; errors reach us as exceptions.
os.environ.setdefault("DECORD_LOG_LEVEL", "quiet")

FRAME_RE = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)
DEFAULT_FRAME_FPS = 25.0  # what the PPMA loader assumes for a frame folder


class VideoDecodeError(RuntimeError):
    """A video that cannot be decoded. ``path`` and ``reason`` are kept for reject lists."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # pickle/copy (Ray moves exceptions between processes)
        return type(self), (self.path, self.reason)


def window_indices(
    num_video_frames: int, fps: float, num_frames: int, clip_seconds: float, start: int
) -> np.ndarray:
    """Frame indices of one window starting at ``start``: ``(num_frames,)`` int64, may repeat."""
    span = window_span(num_video_frames, fps, clip_seconds)
    return np.linspace(start, start + span - 1, num_frames).round().astype(np.int64)


def window_span(num_video_frames: int, fps: float, clip_seconds: float) -> int:
    """Frames covered by a ``clip_seconds`` window, capped at the video's length."""
    return int(max(1, min(num_video_frames, round(clip_seconds * fps))))


class VideoSource:
    """Random access to the frames of one video file or frame folder."""

    def __init__(self, path: str | os.PathLike, fps: float | None = None):
        self.path = str(path)
        p = Path(self.path)
        if not p.exists():
            raise VideoDecodeError(p, "file does not exist")
        if p.is_dir():
            self._frames = _list_frames(p)
            self.fps = float(fps or DEFAULT_FRAME_FPS)
            self._reader = None
        else:
            if p.stat().st_size == 0:
                raise VideoDecodeError(p, "file is empty (0 bytes)")
            self._frames = None
            self._reader = _open_decord(p)
            self.fps = float(fps or self._reader.get_avg_fps() or DEFAULT_FRAME_FPS)
        self.num_frames = len(self._frames) if self._frames is not None else len(self._reader)
        if self.num_frames <= 0:
            raise VideoDecodeError(p, "video has no frames")

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Decode ``indices`` -> ``(len(indices), H, W, C)`` uint8."""
        if self._frames is not None:
            return np.stack([_read_image(self._frames[i]) for i in indices.tolist()])
        unique, inverse = np.unique(indices, return_inverse=True)  # decode each frame once
        try:
            frames = self._reader.get_batch(unique.tolist()).asnumpy()
        except Exception as e:  # decord raises DECORDError, RuntimeError or IndexError
            raise VideoDecodeError(self.path, f"decoding frames failed ({_short(e)})") from None
        if frames.ndim != 4 or frames.shape[0] != len(unique) or frames.shape[-1] != 3:
            raise VideoDecodeError(self.path, f"decoder returned frames of shape {frames.shape}")
        return frames[inverse.reshape(-1)]


def sample_clip(
    path: str | os.PathLike,
    num_frames: int = 16,
    clip_seconds: float = 2.7,
    seed: int | None = None,
    fps: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One random temporal window of a video -> ``(num_frames, H, W, C)`` uint8.

    Args:
        fps: frame rate of a frame folder (required for correct timing there; 25 if not given);
            overrides the container's rate for a file.
        start_s, end_s: restrict the window to this segment of the video (manifest columns).
        seed / rng: the window position is drawn from ``rng`` or from ``default_rng(seed)``.
    """
    src = VideoSource(path, fps)
    lo, hi = _segment(src, start_s, end_s)
    span = window_span(hi - lo, src.fps, clip_seconds)
    rng = rng if rng is not None else np.random.default_rng(seed)
    start = lo + int(rng.integers(0, hi - lo - span + 1))
    return src.get(window_indices(hi - lo, src.fps, num_frames, clip_seconds, start))


def sample_clips(
    path: str | os.PathLike,
    num_clips: int = 2,
    num_frames: int = 16,
    clip_seconds: float = 2.7,
    fps: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
) -> np.ndarray:
    """``num_clips`` evenly spaced windows (deterministic, for evaluation) ->
    ``(num_clips, num_frames, H, W, C)`` uint8. Frames shared by windows are decoded once."""
    src = VideoSource(path, fps)
    lo, hi = _segment(src, start_s, end_s)
    span = window_span(hi - lo, src.fps, clip_seconds)
    starts = np.linspace(lo, hi - span, num_clips).round().astype(np.int64)
    idx = np.stack([window_indices(hi - lo, src.fps, num_frames, clip_seconds, int(s)) for s in starts])
    frames = src.get(idx.reshape(-1))
    return frames.reshape(num_clips, num_frames, *frames.shape[1:])


def probe_video(path: str | os.PathLike, fps: float | None = None) -> dict:
    """Open a video, count its frames and decode its first and last frame (the validator's check).

    Returns ``{"num_frames", "fps", "height", "width"}``; raises ``VideoDecodeError``.
    """
    src = VideoSource(path, fps)
    frames = src.get(np.array([0, src.num_frames - 1]))
    return {"num_frames": src.num_frames, "fps": src.fps, "height": frames.shape[1], "width": frames.shape[2]}


def _segment(src: VideoSource, start_s: float | None, end_s: float | None) -> tuple[int, int]:
    lo = 0 if start_s is None else int(round(start_s * src.fps))
    hi = src.num_frames if end_s is None else min(src.num_frames, int(round(end_s * src.fps)))
    lo = min(max(lo, 0), src.num_frames - 1)
    if hi <= lo:
        raise VideoDecodeError(src.path, f"segment [{start_s}, {end_s}] s holds no frames")
    return lo, hi


def _open_decord(p: Path):
    import decord  # imported lazily: decord pulls in its FFmpeg only where decoding happens

    try:
        return decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:
        raise VideoDecodeError(p, f"cannot open video ({_short(e)})") from None


def _list_frames(folder: Path) -> list[str]:
    numbered = []
    for name in os.listdir(folder):
        m = FRAME_RE.search(name)
        if m:
            numbered.append((int(m.group(1)), name))
    if not numbered:
        raise VideoDecodeError(folder, "frame folder holds no numbered .jpg/.png frames")
    numbered.sort()
    first = numbered[0][0]
    for k, (num, name) in enumerate(numbered):
        if num != first + k:  # a gap would silently shift the timing of every later frame
            raise VideoDecodeError(folder, f"frame folder is missing frame number {first + k} (next is {name})")
    return [str(folder / name) for _, name in numbered]


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise VideoDecodeError(path, f"cannot read frame image ({_short(e)})") from None


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 25.0, crf: int = 23) -> None:
    """Encode ``frames: (T, H, W, C)`` uint8 as an H.264 mp4 with PyAV (H and W must be even)."""
    import av

    t, h, w, _ = frames.shape
    # faststart puts the index first: the file streams, and a truncated file keeps its header
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # one thread and no B-frames keep the bytes identical for identical input
        stream.options = {"crf": str(crf), "threads": "1", "bf": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
