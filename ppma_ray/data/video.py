"""Clip sampling and decoding: video files through decord, PyAV or torchcodec, frame folders at an
explicit fps.

A clip is a random ``clip_seconds`` window, uniformly subsampled to ``num_frames`` frames (frames
repeat when the window holds fewer). Only the sampled frames are decoded. Everything returns
``numpy.uint8`` arrays shaped ``(T, H, W, C)``; conversion to float happens on the training device.

Every failure (missing, empty, truncated or undecodable file, a gap in a frame folder, an object
that cannot be read) raises ``VideoDecodeError`` naming the file, so callers can count and report it
instead of crashing.

A path may be a bucket URI (``s3://``, ``gs://``; ``ppma_ray.data.objectstore``): the object is read
whole into memory, with retries, and decoded from there; a frame folder may be a bucket prefix.

Backends (``backend=``, config ``data.decode.backend``), all returning the same layout and the same
frame for the same index (frame ``i`` is the ``i``-th in presentation order), upright: a phone
stores a portrait video as landscape frames plus a display rotation in the container, and every
backend applies it (decord and torchcodec do so themselves, the PyAV reader here), so one file
gives the same pixels on a laptop decoding with PyAV and on a cluster decoding with decord:

* ``decord``: the default where it installs (its wheels are Linux x86_64 and Windows only);
* ``pyav``: PyAV, which bundles FFmpeg on every platform: it demuxes the packet index once (no
  decoding), then per request seeks to the keyframe before the first wanted frame and decodes
  forward, seeking again only when the next wanted frame lies beyond another keyframe;
* ``torchcodec``: exact-seek mode; it needs a system FFmpeg, so it is used only after a probe
  decode succeeds in the process (``backend_problem``), else a clear error, never a decode failure;
* ``auto``: decord if it imports, else PyAV; and PyAV for a file decord cannot open or decode but
  PyAV can (decord 0.6's FFmpeg predates AV1, which YouTube serves). ``VideoSource.fallback``
  says so, and the pipeline counts such videos (``FailureTracker``), never silently.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import re
from pathlib import Path
from typing import get_args

import numpy as np

from ppma_ray.data import objectstore
from ppma_ray.data.config import DecodeBackend as Backend
from ppma_ray.errors import one_line

# decord's bundled FFmpeg prints every demuxer complaint to stderr; errors reach us as exceptions.
os.environ.setdefault("DECORD_LOG_LEVEL", "quiet")

BACKENDS: tuple[str, ...] = get_args(Backend)
FRAME_RE = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)
DEFAULT_FRAME_FPS = 25.0  # what the PPMA loader assumes for a frame folder
SEQUENTIAL_CHUNK = 32  # frames decord decodes at a time when it decodes a file from the start


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


class BackendUnavailable(RuntimeError):
    """A decoding backend that cannot run in this process: a setup error, not a bad video."""


@functools.cache
def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot decode in this process (None: it can). torchcodec is tried on a
    tiny video written here, since it loads FFmpeg's libraries only when it first decodes."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})"
    if backend == "auto":
        return None
    try:
        if backend in ("decord", "pyav"):
            importlib.import_module({"decord": "decord", "pyav": "av"}[backend])
        else:
            import tempfile

            from torchcodec.decoders import VideoDecoder

            with tempfile.TemporaryDirectory() as d:
                write_video(f"{d}/probe.mp4", np.zeros((2, 16, 16, 3), dtype=np.uint8))
                VideoDecoder(f"{d}/probe.mp4").get_frame_at(0)
    except Exception as e:  # noqa: BLE001 (ImportError, or FFmpeg's libraries failing to load)
        return f"{backend} cannot decode here ({_short(e)})"
    return None


def resolve_backend(backend: str = "auto") -> str:
    """The backend that decodes: ``auto`` is decord where it imports, else PyAV."""
    if backend == "auto":
        return "decord" if backend_problem("decord") is None else "pyav"
    problem = backend_problem(backend)
    if problem:
        raise BackendUnavailable(problem)
    return backend


class VideoSource:
    """Random access to the frames of one video file or frame folder."""

    def __init__(self, path: str | os.PathLike, fps: float | None = None, backend: str = "auto"):
        self.path = str(path)
        self._frames: list[str] | None = None
        self._reader = None
        self.sequential = False  # decoded from the first frame on, never seeking (``_avi_with_b_frames``)
        self._auto = backend == "auto"
        self.backend: str | None = None  # the decoder of this file (None: a frame folder)
        self.fallback: str | None = None  # why decord could not decode it, when ``auto`` gave it to PyAV
        if objectstore.is_uri(self.path):
            self._open_object(backend)
        else:
            p = Path(self.path)
            if not p.exists():
                raise VideoDecodeError(p, "file does not exist")
            if p.is_dir():
                self._frames = [str(p / name) for name in _numbered_frames(p, os.listdir(p))]
            elif p.stat().st_size == 0:
                raise VideoDecodeError(p, "file is empty (0 bytes)")
            else:
                self._open_reader(self.path, backend)
        if self._reader is not None:
            self.fps = float(fps or self._reader.fps or DEFAULT_FRAME_FPS)
            self.num_frames = self._reader.num_frames
        else:
            self.fps = float(fps or DEFAULT_FRAME_FPS)
            self.num_frames = len(self._frames)
        if self.num_frames <= 0:
            self.close()
            raise VideoDecodeError(self.path, "video has no frames")

    def _open_object(self, backend: str) -> None:
        """An object in a bucket, read into memory; or, when no object has that name, a frame
        folder under it."""
        try:
            try:
                data = objectstore.read_bytes(self.path)
            except FileNotFoundError:
                names = [uri.rsplit("/", 1)[1] for uri in objectstore.list_folder(self.path)]
                if not names:
                    raise VideoDecodeError(self.path, "object does not exist") from None
                self._frames = [objectstore.join(self.path, n) for n in _numbered_frames(self.path, names)]
                return
        except OSError as e:  # still failing after the retries: this video is skipped, not the run
            raise VideoDecodeError(self.path, f"cannot read the object ({_short(e)})") from None
        if not data:
            raise VideoDecodeError(self.path, "file is empty (0 bytes)")
        self._open_reader(data, backend)

    def _open_reader(self, source: str | bytes, backend: str) -> None:
        """The decoder for a local path or an object's bytes. Under ``auto``, a file decord cannot
        open (e.g. AV1: its FFmpeg predates the codec) is opened with PyAV instead."""
        self._source = source  # a fallback at decode time opens it again
        self.sequential = _avi_with_b_frames(self.path, self._fresh())
        chosen = resolve_backend(backend)
        try:
            self._reader, self.backend = self._make(chosen), chosen
        except VideoDecodeError as e:
            if not (self._auto and chosen == "decord"):
                raise
            self._reader = self._pyav_instead(e)

    def _fresh(self) -> str | io.BytesIO:
        return self._source if isinstance(self._source, str) else io.BytesIO(self._source)

    def _make(self, backend: str):
        reader = READERS[backend](self._fresh(), self.path)
        reader.sequential = self.sequential
        return reader

    def _pyav_instead(self, error: VideoDecodeError, num_frames: int | None = None) -> "_PyAVReader":
        """``auto``'s fallback: PyAV for a file decord failed on; decord's error if PyAV fails too,
        or counts other than ``num_frames`` frames. Recorded in ``backend``/``fallback`` for the
        caller to count and report (never silent)."""
        try:
            reader = self._make("pyav")
        except VideoDecodeError:
            raise error from None
        if num_frames is not None and reader.num_frames != num_frames:
            reader.close()
            raise error
        self.backend, self.fallback = "pyav", f"decord failed on this {reader.codec} video: {error.reason}"
        return reader

    def close(self) -> None:
        """Free the decoder now (FFmpeg's buffers), not whenever the garbage collector gets to it."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Decode ``indices`` -> ``(len(indices), H, W, C)`` uint8."""
        if self._frames is not None:
            return np.stack([_read_image(self._frames[i]) for i in indices.tolist()])
        unique, inverse = np.unique(indices, return_inverse=True)  # decode each frame once
        try:
            frames = self._decode(unique)
        except VideoDecodeError as e:
            if not (self._auto and self.backend == "decord"):
                raise
            frames = self._decode_with_pyav(unique, e)
        return frames[inverse.reshape(-1)]

    def _decode(self, unique: np.ndarray) -> np.ndarray:
        try:
            frames = self._reader.get(unique)
        except VideoDecodeError:
            raise
        except Exception as e:  # the decoders raise their own errors, RuntimeError or IndexError
            raise VideoDecodeError(self.path, f"decoding frames failed ({_short(e)})") from None
        if frames.ndim != 4 or frames.shape[0] != len(unique) or frames.shape[-1] != 3:
            raise VideoDecodeError(self.path, f"decoder returned frames of shape {frames.shape}")
        return frames

    def _decode_with_pyav(self, unique: np.ndarray, error: VideoDecodeError) -> np.ndarray:
        """``auto``: frames decord opened but could not decode, from PyAV, if PyAV counts the same
        frames (the window was drawn from decord's count); else decord's error."""
        reader = self._pyav_instead(error, self.num_frames)
        self._reader.close()
        self._reader = reader
        try:
            return self._decode(unique)
        except VideoDecodeError:
            raise error from None


# The readers take ``(source, name)``: a local path, or an object's bytes in a ``BytesIO`` (every
# library here decodes from memory), and the name errors report.

class _DecordReader:
    def __init__(self, source: str | io.BytesIO, name: str):
        import decord  # imported lazily: decord pulls in its FFmpeg only where decoding happens

        try:
            self._reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:
            raise VideoDecodeError(name, f"cannot open video ({_short(e)})") from None
        self.num_frames, self.fps = len(self._reader), self._reader.get_avg_fps()

    sequential = False

    def get(self, indices: np.ndarray) -> np.ndarray:
        if not self.sequential:
            return self._reader.get_batch(indices.tolist()).asnumpy()
        # consecutive runs from frame 0: decord seeks only to frame 0 (which it finds right) and
        # then decodes forward; in chunks, so that a long video never sits in memory whole
        out, end = [], int(indices[-1]) + 1
        for start in range(0, end, SEQUENTIAL_CHUNK):
            stop = min(start + SEQUENTIAL_CHUNK, end)
            chunk = self._reader.get_batch(list(range(start, stop)))
            wanted = indices[(indices >= start) & (indices < stop)]  # ``indices``: unique, ascending
            if len(wanted):
                out.append(chunk.asnumpy()[wanted - start])
        return np.concatenate(out)

    def close(self) -> None:
        del self._reader


class _PyAVReader:
    def __init__(self, source: str | io.BytesIO, name: str):
        import av

        self.path = name
        self._container = None
        try:
            self._container = av.open(source)
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = 1  # one decode task per reserved CPU, as decord
            pts, keys = [], []
            for packet in self._container.demux(self._stream):  # the index: packets only, nothing decoded
                if packet.pts is not None and packet.size:
                    pts.append(packet.pts)
                    if packet.is_keyframe:
                        keys.append(packet.pts)
        except Exception as e:
            if self._container is not None:  # opened, but its packets cannot be read
                self._container.close()
            raise VideoDecodeError(name, f"cannot open video ({_short(e)})") from None
        self._pts = np.sort(np.asarray(pts, dtype=np.int64))  # frame i: the i-th in presentation order
        self._keys = np.sort(np.asarray(keys or pts[:1], dtype=np.int64))
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.num_frames, self.fps = len(self._pts), float(rate) if rate else None
        self.codec = self._stream.codec_context.codec.canonical_name  # "av1", not its decoder "libdav1d"

    def close(self) -> None:
        self._container.close()

    def _key_before(self, pts: int) -> int:
        i = int(np.searchsorted(self._keys, pts, side="right")) - 1
        return int(self._keys[max(i, 0)])

    sequential = False

    def get(self, indices: np.ndarray) -> np.ndarray:
        if self.sequential:
            return self._get_counting(indices)
        targets = self._pts[indices]  # ascending: indices are unique and sorted
        out, k = [], 0
        while k < len(targets):
            self._container.seek(self._key_before(targets[k]), stream=self._stream, backward=True, any_frame=False)
            for frame in self._container.decode(self._stream):
                if frame.pts is None or frame.pts < targets[k]:
                    continue
                if frame.pts > targets[k]:
                    raise VideoDecodeError(self.path, f"frame {indices[k]} (pts {targets[k]}) is missing after a seek")
                out.append(_upright(frame))
                k += 1
                if k == len(targets) or self._key_before(targets[k]) > frame.pts:
                    break  # done, or the next wanted frame is faster reached by seeking to its keyframe
            else:
                raise VideoDecodeError(self.path, f"the stream ended before frame {indices[min(k, len(indices) - 1)]}")
        return np.stack(out)

    def _get_counting(self, indices: np.ndarray) -> np.ndarray:
        """Frame i as the i-th frame decoded from the start, for files whose timestamps cannot be
        trusted to order frames (``_avi_with_b_frames``)."""
        self._container.seek(0, stream=self._stream, backward=True, any_frame=False)
        wanted, out = set(indices.tolist()), []
        for i, frame in enumerate(self._container.decode(self._stream)):
            if i in wanted:
                out.append(_upright(frame))
                if len(out) == len(wanted):
                    return np.stack(out)
        raise VideoDecodeError(self.path, f"the stream ended before frame {int(indices[len(out)])}")


def _avi_with_b_frames(name: str, source: str | io.BytesIO) -> bool:
    """Whether ``source`` is an AVI file with B-frames. AVI stores frames in decoding order with no
    presentation timestamps; with B-frames the two orders differ, and after a seek decord counts
    frames in the wrong order (its keyframe list for such a file is off by one or two) and
    torchcodec by timestamps FFmpeg could only guess: both returned other frames than asked for
    (decord issues #195 on HMDB51 and #252). Such a file is decoded from its first frame on, never
    seeking (``VideoSource.sequential``). Others, and AVIs without B-frames, seek as usual."""
    if not name.lower().endswith(".avi"):
        return False
    import av

    try:
        with av.open(source) as container:
            return "avi" in container.format.name and bool(container.streams.video[0].codec_context.has_b_frames)
    except Exception:  # noqa: BLE001 (opening it with the chosen backend reports what is wrong)
        return False


def _upright(frame) -> np.ndarray:
    """A decoded PyAV frame as players show it -> ``(H, W, 3)`` uint8: the container's display
    rotation applied (counter-clockwise degrees, as decord and torchcodec apply it; a 90-degree
    turn swaps height and width). PyAV leaves it to the caller."""
    array = frame.to_ndarray(format="rgb24")
    turns = round(frame.rotation / 90) % 4
    return np.rot90(array, turns) if turns else array


class _TorchCodecReader:
    def __init__(self, source: str | io.BytesIO, name: str):
        from torchcodec.decoders import VideoDecoder

        self.path = name
        try:
            self._decoder = VideoDecoder(source if isinstance(source, str) else source.getvalue(), seek_mode="exact",
                                         num_ffmpeg_threads=1)
        except Exception as e:
            raise VideoDecodeError(name, f"cannot open video ({_short(e)})") from None
        meta = self._decoder.metadata
        self.num_frames, self.fps = len(self._decoder), meta.average_fps

    sequential = False

    def get(self, indices: np.ndarray) -> np.ndarray:
        if self.sequential:  # it indexes frames by timestamps, which such a file does not store
            raise VideoDecodeError(self.path, "torchcodec cannot find the frames of an AVI file with B-frames "
                                              "(data.decode.backend decord or pyav decodes it)")
        return self._decoder.get_frames_at(indices.tolist()).data.permute(0, 2, 3, 1).numpy()

    def close(self) -> None:
        del self._decoder


READERS = {"decord": _DecordReader, "pyav": _PyAVReader, "torchcodec": _TorchCodecReader}


def sample_clip(
    path: str | os.PathLike,
    num_frames: int = 16,
    clip_seconds: float = 2.7,
    seed: int | None = None,
    fps: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    rng: np.random.Generator | None = None,
    backend: Backend = "auto",
) -> np.ndarray:
    """One random temporal window of a video -> ``(num_frames, H, W, C)`` uint8.

    Args:
        fps: frame rate of a frame folder (required for correct timing there; 25 if not given);
            overrides the container's rate for a file.
        start_s, end_s: restrict the window to this segment of the video (manifest columns).
        seed / rng: the window position is drawn from ``rng`` or from ``default_rng(seed)``.
        backend: ``auto``, ``decord``, ``pyav`` or ``torchcodec`` (module docstring).
    """
    with VideoSource(path, fps, backend) as src:
        return random_window(src, num_frames, clip_seconds, rng if rng is not None else np.random.default_rng(seed),
                             start_s, end_s)


def random_window(src: VideoSource, num_frames: int, clip_seconds: float, rng: np.random.Generator,
                  start_s: float | None = None, end_s: float | None = None) -> np.ndarray:
    """``sample_clip`` on an open ``VideoSource`` -> ``(num_frames, H, W, C)`` uint8."""
    lo, hi = _segment(src, start_s, end_s)
    span = window_span(hi - lo, src.fps, clip_seconds)
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
    backend: Backend = "auto",
) -> np.ndarray:
    """``num_clips`` evenly spaced windows (deterministic, for evaluation) ->
    ``(num_clips, num_frames, H, W, C)`` uint8. Frames shared by windows are decoded once."""
    with VideoSource(path, fps, backend) as src:
        return even_windows(src, num_clips, num_frames, clip_seconds, start_s, end_s)


def even_windows(src: VideoSource, num_clips: int, num_frames: int, clip_seconds: float,
                 start_s: float | None = None, end_s: float | None = None) -> np.ndarray:
    """``sample_clips`` on an open ``VideoSource`` -> ``(num_clips, num_frames, H, W, C)`` uint8."""
    lo, hi = _segment(src, start_s, end_s)
    span = window_span(hi - lo, src.fps, clip_seconds)
    starts = np.linspace(lo, hi - span, num_clips).round().astype(np.int64)
    idx = np.stack([window_indices(hi - lo, src.fps, num_frames, clip_seconds, int(s)) for s in starts])
    frames = src.get(idx.reshape(-1))
    return frames.reshape(num_clips, num_frames, *frames.shape[1:])


def probe_video(path: str | os.PathLike, fps: float | None = None, backend: Backend = "auto") -> dict:
    """Open a video, count its frames and decode its first and last frame (the validator's check).

    Returns ``{"num_frames", "fps", "height", "width", "backend", "fallback"}`` (``VideoSource``'s
    ``backend`` and ``fallback``); raises ``VideoDecodeError``.
    """
    with VideoSource(path, fps, backend) as src:
        frames = src.get(np.array([0, src.num_frames - 1]))
        return {"num_frames": src.num_frames, "fps": src.fps, "height": frames.shape[1], "width": frames.shape[2],
                "backend": src.backend, "fallback": src.fallback}


def _segment(src: VideoSource, start_s: float | None, end_s: float | None) -> tuple[int, int]:
    lo = 0 if start_s is None else int(round(start_s * src.fps))
    hi = src.num_frames if end_s is None else min(src.num_frames, int(round(end_s * src.fps)))
    lo = min(max(lo, 0), src.num_frames - 1)
    if hi <= lo:
        raise VideoDecodeError(src.path, f"segment [{start_s}, {end_s}] s holds no frames")
    return lo, hi


def _numbered_frames(folder: str | Path, names: list[str]) -> list[str]:
    """The numbered ``.jpg``/``.png`` names among ``names``, in frame order; a gap is an error."""
    numbered = []
    for name in names:
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
    return [name for _, name in numbered]


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        source = io.BytesIO(objectstore.read_bytes(path)) if objectstore.is_uri(path) else path
        with Image.open(source) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise VideoDecodeError(path, f"cannot read frame image ({_short(e)})") from None


# decord's errors start with the time and its source line: "[20:10:19] /github/.../video_reader.cc:151: "
_DECORD_PREFIX = re.compile(r"^(\w+: )\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _short(e: Exception) -> str:
    return _DECORD_PREFIX.sub(r"\1", one_line(e, 260))


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
