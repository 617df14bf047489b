import numpy as np
import pytest

from ppma_ray.data.video import (VideoDecodeError, VideoSource, backend_problem, probe_video, sample_clip, sample_clips,
                                 window_indices)

# the backends this machine can run; torchcodec needs a system FFmpeg
DECODERS = [pytest.param(b, marks=pytest.mark.skipif(bool(backend_problem(b)), reason=str(backend_problem(b))))
            for b in ("decord", "pyav", "torchcodec")]


def _pyav_frames(path, indices):
    """Independent decode of the same frames with PyAV (decode all, pick by index)."""
    import av

    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack([frames[i] for i in indices])


@pytest.mark.parametrize("name", ["bikes", "bigbuckbunny"])
def test_real_footage_decodes_and_matches_pyav(sample_videos, name):
    path = sample_videos[name]
    info = probe_video(path)
    clip = sample_clip(path, num_frames=16, clip_seconds=2.7, seed=3)
    assert clip.dtype == np.uint8 and clip.shape == (16, info["height"], info["width"], 3)
    # reproduce the window the seed picked, then decode those frames with PyAV
    span = round(2.7 * info["fps"])
    start = int(np.random.default_rng(3).integers(0, info["num_frames"] - span + 1))
    idx = window_indices(info["num_frames"], info["fps"], 16, 2.7, start)
    ref = _pyav_frames(path, idx)
    # two FFmpeg builds may differ by rounding in the YUV->RGB conversion, not more
    assert np.abs(clip.astype(int) - ref.astype(int)).mean() < 2.0


def test_bikes_frame_count(sample_videos):
    info = probe_video(sample_videos["bikes"])
    assert (info["num_frames"], info["fps"], info["height"], info["width"]) == (250, 25.0, 272, 640)


def test_window_is_2_7_seconds_uniformly_subsampled():
    idx = window_indices(250, 25.0, 16, 2.7, start=10)
    assert idx[0] == 10 and idx[-1] == 10 + 68 - 1 and np.all(np.diff(idx) > 0)
    short = window_indices(5, 25.0, 16, 2.7, start=0)  # shorter video: frames repeat
    assert short.min() == 0 and short.max() == 4 and len(short) == 16


def test_seed_is_reproducible_and_clips_differ(video_dir):
    a = sample_clip(video_dir / "good0.mp4", num_frames=4, clip_seconds=0.2, seed=1)
    b = sample_clip(video_dir / "good0.mp4", num_frames=4, clip_seconds=0.2, seed=1)
    assert np.array_equal(a, b)
    others = [sample_clip(video_dir / "good0.mp4", num_frames=4, clip_seconds=0.2, seed=s) for s in range(2, 8)]
    assert any(not np.array_equal(a, o) for o in others)


def test_multi_clip_is_deterministic_and_evenly_spaced(video_dir):
    clips = sample_clips(video_dir / "good1.mp4", num_clips=2, num_frames=4, clip_seconds=0.4)
    assert clips.shape == (2, 4, 64, 80, 3)
    assert np.array_equal(clips, sample_clips(video_dir / "good1.mp4", num_clips=2, num_frames=4, clip_seconds=0.4))
    assert not np.array_equal(clips[0], clips[1])  # first and last window of the video


def test_frame_folder_at_explicit_fps(video_dir):
    clip = sample_clip(video_dir / "frames_ok", num_frames=8, clip_seconds=0.24, fps=25, seed=0)
    assert clip.shape == (8, 64, 80, 3) and clip.dtype == np.uint8
    assert probe_video(video_dir / "frames_ok")["num_frames"] == 12


@pytest.mark.parametrize(
    "name, words",
    [
        ("empty.mp4", "empty"),
        ("truncated.mp4", ""),
        ("text.mp4", "cannot open"),
        ("missing.mp4", "does not exist"),
        ("frames_gap", "missing frame number 3"),
    ],
)
@pytest.mark.parametrize("backend", DECODERS)
def test_corrupt_inputs_raise_video_decode_error_naming_the_file(video_dir, name, words, backend):
    with pytest.raises(VideoDecodeError) as e:
        sample_clip(video_dir / name, seed=0, backend=backend)
    assert str(video_dir / name) in str(e.value) and words in str(e.value)


@pytest.fixture(scope="module")
def containers(tmp_path_factory) -> dict:
    """Moving content made with PyAV (``conftest.encode_videos``), 30 frames 48x64 with a keyframe
    every 8, so reaching a frame means seeking past earlier keyframes: H.264 .mp4 with B-frames,
    VP9 .webm, MPEG-4 .avi, an H.264 .mp4 with a variable frame rate (30 and 50 ms frames), and AVIs
    with B-frames (MPEG-4 and H.264: AVI stores no presentation timestamps, and seeks went wrong).
    With a display rotation: a phone's portrait footage (96x64 stored, turned 90 and -90 degrees)
    and a file decord 0.6 opens but cannot decode (turned to 48 wide: "The size must exactly
    match"; phones' are 360 and wider)."""
    import av

    from conftest import encode_videos

    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot write a display rotation (18 can)")
    yy, xx = np.mgrid[0:48, 0:64]
    frames = np.stack([np.stack([(xx * 4 + 9 * i) % 256, (yy * 5 + 3 * i) % 256, np.full_like(xx, 20 + 7 * i)], -1)
                       for i in range(30)]).astype(np.uint8)
    yy, xx = np.mgrid[0:64, 0:96]
    portrait = np.stack([np.stack([(xx * 3 + 9 * i) % 256, (yy * 4) % 256, np.where(xx < 48, 200, 30)], -1)
                         for i in range(12)]).astype(np.uint8)
    bframes = {"bf": "2"}
    return encode_videos(tmp_path_factory.mktemp("containers"), [
        {"name": "h264_bframes.mp4", "frames": frames, "codec": "libx264", "gop": 8, "options": bframes},
        {"name": "vp9.webm", "frames": frames, "codec": "libvpx-vp9", "gop": 8},
        {"name": "mpeg4.avi", "frames": frames, "codec": "mpeg4", "gop": 8, "options": {"qscale": "2"}},
        {"name": "vfr.mp4", "frames": frames, "codec": "libx264", "gop": 8, "options": bframes, "vfr": True},
        {"name": "mpeg4_bframes.avi", "frames": frames, "codec": "mpeg4", "gop": 8, "options": {**bframes, "qscale": "2"}},
        {"name": "h264_bframes.avi", "frames": frames, "codec": "libx264", "gop": 8, "options": bframes},
        {"name": "narrow_rotated.mp4", "frames": frames[:12], "codec": "libx264", "rotation": 90},
        {"name": "rotated90.mp4", "frames": portrait, "codec": "libx264", "rotation": 90},
        {"name": "rotated270.mp4", "frames": portrait, "codec": "libx264", "rotation": -90},
    ])


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("name", ["h264_bframes.mp4", "vp9.webm", "mpeg4.avi", "vfr.mp4"])
def test_every_backend_gives_the_same_frames_for_the_same_indices(containers, name, backend):
    """Frame i is the i-th frame a plain decode of the whole file yields (PyAV, no seeking), for
    sparse indices across keyframes, in any order and repeated. Tolerance: a mean absolute
    difference under 1 (two FFmpeg builds may round the YUV->RGB conversion differently)."""
    path = containers[name]
    src = VideoSource(path, backend=backend)
    assert src.num_frames == 30
    indices = np.array([29, 0, 13, 7, 8, 7, 21, 16, 3])
    reference = _pyav_frames(path, indices)
    got = src.get(indices)
    assert got.shape == reference.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - reference.astype(int)).mean(axis=(1, 2, 3)).max() < 1.0
    assert probe_video(path, backend=backend)["num_frames"] == 30


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("name", ["mpeg4_bframes.avi", "h264_bframes.avi"])
def test_an_avi_with_b_frames_gives_the_frames_asked_for(containers, name, backend):
    """AVI (UCF101's and HMDB51's container) keeps no presentation timestamps. With B-frames,
    decord's seeks returned frames 0, 3, 0, 1, 9, 12, 23, 28 of the MPEG-4 file when asked for
    0, 3, 7, 8, 13, 16, 21, 29 (and PyAV's seek failed on the H.264 one): such a file is decoded
    from its first frame on. torchcodec, which indexes by timestamps, refuses it by name."""
    path = containers[name]
    indices = np.array([29, 0, 13, 7, 8, 7, 21, 16, 3])
    src = VideoSource(path, backend=backend)
    assert src.sequential and src.num_frames == 30
    if backend == "torchcodec":
        with pytest.raises(VideoDecodeError, match="torchcodec cannot find the frames of an AVI file with B-frames"):
            src.get(indices)
        return
    reference = _pyav_frames(path, indices)
    got = src.get(indices)
    assert np.abs(got.astype(int) - reference.astype(int)).mean(axis=(1, 2, 3)).max() < 1.0
    assert np.array_equal(src.get(np.array([16, 3])), got[[7, 8]])  # again, from a reader left mid-file
    assert not VideoSource(containers["mpeg4.avi"], backend=backend).sequential  # without B-frames: seeks as usual


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("name, turns", [("rotated90.mp4", 1), ("rotated270.mp4", 3)])
def test_every_backend_turns_rotated_footage_upright(containers, name, turns, backend):
    """A video stored sideways with a display rotation (how phones store portrait footage) comes
    out as players show it, from every backend: decord and torchcodec turn it themselves, PyAV left
    it sideways (a laptop decoding with PyAV trained on other pixels than a cluster with decord).
    Reference: a plain PyAV decode of the stored frames, turned by the rotation the file was written
    with (``np.rot90``, counter-clockwise)."""
    path = containers[name]
    indices = np.array([11, 0, 5, 5])
    reference = np.rot90(_pyav_frames(path, indices), turns, axes=(1, 2))
    got = VideoSource(path, backend=backend).get(indices)
    assert reference.shape == (4, 96, 64, 3) and got.shape == reference.shape  # portrait: 96 high, 64 wide
    assert np.abs(got.astype(int) - reference.astype(int)).mean(axis=(1, 2, 3)).max() < 1.0
    info = probe_video(path, backend=backend)
    assert (info["height"], info["width"]) == (96, 64)


@pytest.mark.skipif(bool(backend_problem("decord")), reason="without decord, auto is PyAV already")
def test_auto_gives_pyav_the_videos_decord_cannot_decode_and_says_so(av1_video, video_dir):
    """decord 0.6's FFmpeg predates AV1 (what YouTube serves): asked for by name, decord fails on
    such a file; ``auto`` decodes it with PyAV and records why (``fallback``), so the pipeline can
    count it. The frames are PyAV's own: those of a plain decode."""
    with pytest.raises(VideoDecodeError, match="cannot open video"):
        VideoSource(av1_video, backend="decord")
    indices = np.array([23, 0, 9, 9])
    with VideoSource(av1_video) as src:
        got = src.get(indices)
        assert src.backend == "pyav" and src.num_frames == 24
        assert src.fallback.startswith("decord failed on this av1 video: cannot open video (DECORDError: ")
        assert "[" not in src.fallback.split("DECORDError: ")[1][:1]  # decord's time and source line dropped
    assert np.abs(got.astype(int) - _pyav_frames(av1_video, indices).astype(int)).max() == 0
    info = probe_video(av1_video)
    assert info["backend"] == "pyav" and info["fallback"] and info["num_frames"] == 24
    with VideoSource(av1_video, backend="pyav") as src:  # asked for by name: nothing fell back
        assert src.backend == "pyav" and src.fallback is None
    assert probe_video(video_dir / "good0.mp4")["backend"] == "decord"  # H.264: decord's, as always


@pytest.mark.skipif(bool(backend_problem("decord")), reason="without decord, auto is PyAV already")
def test_auto_gives_pyav_a_video_decord_opens_but_cannot_decode(containers):
    """The fallback at decode time: decord opens this file (a rotation that leaves it 48 wide) and
    counts its frames, then fails to decode them; ``auto`` decodes them with PyAV, which counts the
    same frames, and records decord's error."""
    path = containers["narrow_rotated.mp4"]
    with pytest.raises(VideoDecodeError, match="size must exactly match"):
        VideoSource(path, backend="decord").get(np.array([0, 5]))
    indices = np.array([11, 0, 5])
    with VideoSource(path) as src:
        assert src.backend == "decord" and src.fallback is None  # opened by decord
        got = src.get(indices)
        assert src.backend == "pyav" and src.fallback.startswith("decord failed on this h264 video: decoding frames failed")
    reference = np.rot90(_pyav_frames(path, indices), 1, axes=(1, 2))
    assert got.shape == reference.shape == (3, 64, 48, 3)
    assert np.abs(got.astype(int) - reference.astype(int)).mean(axis=(1, 2, 3)).max() < 1.0


def test_without_decord_the_package_imports_and_auto_decodes_with_pyav(sample_videos):
    """As on macOS arm64 or Linux aarch64, where decord has no wheel."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['decord'] = None\n"  # import decord now raises ImportError
            "import ppma_ray, ppma_ray.data.pipeline\n"
            "from ppma_ray.data.video import resolve_backend, sample_clip\n"
            f"print(resolve_backend('auto'), sample_clip({str(sample_videos['bikes'])!r}, num_frames=4, seed=0).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["pyav", "(4,", "272,", "640,", "3)"]


def test_a_backend_that_cannot_decode_here_is_refused_before_ray(capsys):
    from ppma_ray.cli import pretrain

    if backend_problem("torchcodec") is None:
        pytest.skip("torchcodec decodes on this machine")
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--set", "data.decode.backend=torchcodec"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "data.decode.backend" in err and "torchcodec cannot decode here" in err, err
