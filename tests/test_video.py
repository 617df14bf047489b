import numpy as np
import pytest

from ppma_ray.data.video import VideoDecodeError, probe_video, sample_clip, sample_clips, window_indices


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
def test_corrupt_inputs_raise_video_decode_error_naming_the_file(video_dir, name, words):
    with pytest.raises(VideoDecodeError) as e:
        sample_clip(video_dir / name, seed=0)
    assert str(video_dir / name) in str(e.value) and words in str(e.value)
