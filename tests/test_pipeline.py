import csv
import io

import numpy as np
import pytest

from ppma_ray.data.demo import make_demo
from ppma_ray.data.manifest import read_manifest
from ppma_ray.data.mixing import plan_epoch
from ppma_ray.data.config import ClipConfig, DecodeConfig
from ppma_ray.data.pipeline import DataFailureError, FailureTracker, Source, build_dataset, plan_to_table, task_rows
from ppma_ray.data.transforms import EvalTransform, TrainTransform
from ppma_ray.data.video import backend_problem, sample_clip

CLIP = ClipConfig(num_frames=8, clip_seconds=1.2, img_size=32, short_side=40)
DECODE = DecodeConfig()


@pytest.fixture(scope="module")
def demo(demo_root):
    return demo_root, make_demo(demo_root, seed=0)


@pytest.mark.integration  # starts processes
def test_the_demo_is_written_by_fresh_processes_never_forks_of_the_caller(tmp_path, monkeypatch):
    """The caller may run Ray's threads (the jobs generate the demo after Ray started, the tests in a
    worker that holds a Ray session): a fork would copy them mid-flight."""
    import os

    from ppma_ray.data import demo

    def no_fork():
        raise AssertionError("make_demo forked the calling process")

    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(demo, "LAYOUT", {"nohuman": (1, 0)})  # this process's plan: 6 videos
    m = make_demo(tmp_path, seed=0)
    assert len(m["nohuman"]["train"].read_text().splitlines()) == 6


def _sources(demo):
    root, m = demo
    return [Source("nohuman", read_manifest(m["nohuman"]["train"], root=root / "nohuman")),
            Source("synthetic", read_manifest(m["synthetic"]["train"], root=root / "synthetic"))]


def test_demo_generator_is_deterministic_and_decodes(demo, tmp_path):
    """Videos generated again from the same (seed, set, split, index) decode to the same frames."""
    from ppma_ray.data.demo import LAYOUT, _job

    root, m = demo
    for kind in ("nohuman", "motion"):
        lines = m[kind]["val"].read_text().splitlines()
        assert len(lines) == 6 * LAYOUT[kind][1]
        for idx in (0, 7):
            (tmp_path / kind / "val").mkdir(parents=True, exist_ok=True)
            rel, label = _job((str(tmp_path), kind, "val", idx, (idx // 2) % 6, 0))
            assert lines[idx] == f"{rel.split('/', 1)[1]};{label}"
            x = sample_clip(root / rel, num_frames=4, seed=0)
            y = sample_clip(tmp_path / rel, num_frames=4, seed=0)
            assert x.shape == (4, 64, 64, 3) and np.array_equal(x, y)
    labels = read_manifest(m["synthetic"]["train"]).column("label").to_pylist()
    assert sorted(set(labels)) == list(range(6))


def test_transforms_share_one_crop_per_clip_and_eval_gives_three_crops():
    clip = np.random.default_rng(0).integers(0, 255, size=(4, 48, 80, 3), dtype=np.uint8)
    clip[:] = clip[0]  # identical frames stay identical under one crop for the whole clip
    out = TrainTransform(ClipConfig(img_size=32, short_side=40))(clip, seed=1)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[0], f) for f in out)
    assert np.array_equal(out, TrainTransform(ClipConfig(img_size=32, short_side=40))(clip, seed=1))
    views = EvalTransform(crop_size=32)(clip)
    assert views.shape == (3, 4, 32, 32, 3) and not np.array_equal(views[0], views[2])


def test_pipeline_batches_shapes_labels_and_planned_proportion(ray_session, demo):
    sources = _sources(demo)
    plan = plan_epoch([s.table.num_rows for s in sources], [0.25, 0.75], 16, seed=0, epoch=0)
    table = plan_to_table(sources, plan)
    ds = build_dataset(table, CLIP, DECODE, seed=0, repeats=2).materialize()
    assert ds.num_blocks() == 2  # a task's block each: 8 videos (16 clips), both CPUs busy
    batches = list(ds.iter_torch_batches(batch_size=8))
    video = np.concatenate([b["video"].numpy() for b in batches])
    assert video.shape == (32, 8, 32, 32, 3) and video.dtype == np.uint8
    src = np.concatenate([b["source"].numpy() for b in batches])
    assert np.bincount(src).tolist() == [8, 24]  # 4 + 12 videos, 2 clips each
    label = np.concatenate([b["label"].numpy() for b in batches])
    assert np.array_equal(label, np.repeat(table.column("label").to_numpy(), 2))  # plan order is kept
    assert not np.array_equal(video[0], video[1])  # the two replicas have different crops


def test_a_decode_task_decodes_16_clips_worth_of_videos_and_short_lists_still_use_every_cpu():
    """Ray's cost per task is fixed (about 12 ms of CPU across its processes), so a task decodes
    16 clips' worth; a short list is spread over the tasks that can run at once."""
    assert task_rows(1000, DECODE, clips_per_video=1, parallel=2) == 16
    assert task_rows(1000, DECODE, clips_per_video=4, parallel=2) == 4  # 4 repeated augmentations
    assert task_rows(1000, DECODE, clips_per_video=2, parallel=2) == 8  # evaluation's 2 windows a video
    assert task_rows(1000, DECODE, clips_per_video=32, parallel=2) == 1
    assert task_rows(10, DECODE, clips_per_video=1, parallel=2) == 5  # both CPUs, not one task of 10
    assert task_rows(10, DECODE, clips_per_video=1, parallel=0) == 10  # no CPU node yet: one task
    assert task_rows(1000, DecodeConfig(rows_per_task=3), clips_per_video=1, parallel=2) == 3


def test_the_tasks_that_run_at_once_follow_the_limits_and_need_no_ray_init(monkeypatch):
    """Before ``ray.init`` (a notebook), Ray Data starts a local instance on its own: the task size
    must not ask the cluster (which raises then) but count this machine's CPUs."""
    import os

    import ray

    from ppma_ray.data import pipeline

    assert pipeline._parallel_tasks(DecodeConfig(max_concurrency=3)) == 3
    assert pipeline._parallel_tasks(DecodeConfig(cpu_limit=6, num_cpus_per_task=2)) == 3
    assert pipeline._parallel_tasks(DecodeConfig(cpu_limit=0.5)) == 1
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: pytest.fail("asked the cluster before ray.init"))
    assert pipeline._parallel_tasks(DECODE) == os.cpu_count()


def test_corrupt_videos_are_skipped_counted_and_the_threshold_stops_the_run(ray_session, demo, video_dir):
    sources = _sources(demo)
    bad = read_manifest_rows(video_dir)
    sources.append(Source("broken", bad))
    plan = np.array([[0, 0], [2, 0], [1, 0], [2, 1], [0, 1], [1, 1]], dtype=np.int64)
    ds = build_dataset(plan_to_table(sources, plan), CLIP, DECODE, seed=0, repeats=2)
    tracker = FailureTracker(sources, max_failure_rate=0.5, min_videos=1)
    kept = [tracker.update({k: v.numpy() for k, v in b.items()}) for b in ds.iter_torch_batches(batch_size=4)]
    assert sum(len(b["label"]) for b in kept) == 8 and tracker.failed_clips == 4
    assert tracker.summary()["broken"] == {"videos": 2, "failed": 2}  # per video, not per clip (repeats=2)
    rows = list(csv.DictReader(io.StringIO(tracker.rejects_csv())))
    assert [r["path"].split("/")[-1] for r in rows] == ["empty.mp4", "text.mp4"]
    assert all(r["source"] == "broken" and r["reason"] and not r["reason"].startswith(r["path"]) for r in rows)  # path: its own column
    assert rows[0]["reason"] == "file is empty (0 bytes)"
    strict = FailureTracker(sources, max_failure_rate=0.0, min_videos=1)
    with pytest.raises(DataFailureError, match="failed to decode"):
        for b in ds.iter_torch_batches(batch_size=4):
            strict.update({k: v.numpy() for k, v in b.items()})


@pytest.mark.skipif(bool(backend_problem("decord")), reason="without decord, auto is PyAV already")
def test_videos_decord_cannot_decode_train_with_pyav_and_are_counted(demo, av1_video):
    """Under ``auto`` an AV1 video (decord cannot open it) is decoded with PyAV, not rejected; the
    batch marks its clips (``fallback``), the tracker counts it per video, keeps it through a
    checkpoint, and gives one note naming the video and decord's error."""
    import pyarrow as pa

    from ppma_ray.data.pipeline import decode_batch, decode_eval_batch

    root, m = demo
    h264 = str(root / "nohuman" / read_manifest(m["nohuman"]["train"]).column("path")[0].as_py())
    table = pa.table({"path": [h264, str(av1_video)], "label": [0, 1]})
    sources = [Source("mine", table)]
    rows = plan_to_table(sources, np.array([[0, 0], [0, 1]], dtype=np.int64)).to_pydict()
    batch = {k: np.asarray(v, dtype=object if k == "path" else None) for k, v in rows.items()}
    out = decode_batch(batch, CLIP, seed=0, repeats=2)
    assert out["ok"].tolist() == [1, 1, 1, 1] and out["fallback"].tolist() == [0, 0, 1, 1]
    assert out["video"][2:].std() > 10  # real pixels, not the zeros of a failed clip
    strict = decode_batch(batch, CLIP, seed=0, repeats=2, backend="decord")
    assert strict["ok"].tolist() == [1, 1, 0, 0] and not strict["fallback"].any()
    views = decode_eval_batch(batch, CLIP, num_clips=2, num_crops=1)
    assert views["ok"].tolist() == [1, 1] and views["fallback"].tolist() == [0, 1]

    tracker = FailureTracker(sources)
    kept = tracker.update(out)
    assert len(kept["ok"]) == 4 and tracker.summary() == {"mine": {"videos": 2, "failed": 0, "decoded_by_pyav": 1}}
    tracker.update(out)  # the same video again (another epoch): still one
    note = tracker.fallback_note()
    assert note.startswith(f"note: {av1_video}: decord failed on this av1 video: cannot open video") and "1 so far" in note
    assert tracker.fallback_note() is None  # said once; counted from then on
    restored = FailureTracker(sources)
    restored.load_state_dict(tracker.state_dict())
    assert restored.summary() == tracker.summary()


def _batch(source: int, rows, ok, repeats: int = 4) -> dict:
    rows = np.repeat(np.asarray(rows), repeats)
    return {"source": np.full(len(rows), source), "row": rows, "ok": np.repeat(np.asarray(ok, dtype=np.int64), repeats),
            "label": np.zeros(len(rows), dtype=np.int64)}


def test_failures_are_judged_per_video_with_confidence_and_survive_a_checkpoint(monkeypatch):
    """3% bad videos under a 5% limit train through every epoch (k = 4 clips each); a single bad
    video among the first ever seen does not stop a run; a source whose every video fails stops
    after min_videos videos; the state round-trips through a checkpoint and merges across ranks."""
    import pyarrow as pa

    from ppma_ray.data import pipeline

    monkeypatch.setattr(pipeline, "decode_error", lambda path, fps=None, backend="auto": f"cannot open {path}")
    n = 1000
    table = pa.table({"path": [f"v{i}.mp4" for i in range(n)], "label": [0] * n})
    bad = set(np.random.default_rng(0).choice(n, 30, replace=False).tolist())
    tracker = FailureTracker([Source("nohuman", table)], max_failure_rate=0.05)
    tracker.update(_batch(0, [min(bad)], [0]))  # the very first video fails
    for epoch in range(3):
        order = np.random.default_rng(epoch).permutation(n)
        for chunk in np.array_split(order, n // 8):
            kept = tracker.update(_batch(0, chunk, [int(r) not in bad for r in chunk]))
            assert kept["ok"].all()
    assert tracker.summary() == {"nohuman": {"videos": n, "failed": 30}} and tracker.failed_clips == 3 * 30 * 4 + 4

    broken = FailureTracker([Source("broken", table)], max_failure_rate=0.05, min_videos=50)
    with pytest.raises(DataFailureError, match=r"50 of 50 videos failed"):
        for r in range(n):
            broken.update(_batch(0, [r], [0]))

    a, b = (FailureTracker([Source("nohuman", table)]) for _ in range(2))
    a.update(_batch(0, [1, 2, 3], [1, 0, 1]))
    b.update(_batch(0, [3, 4], [1, 0]))
    a.merge([b.state_dict()])
    restored = FailureTracker([Source("nohuman", table)])
    restored.load_state_dict(a.state_dict())
    assert restored.summary() == a.summary() == {"nohuman": {"videos": 4, "failed": 2}}
    assert restored.rejects == {(0, 2): "cannot open v2.mp4", (0, 4): "cannot open v4.mp4"}


def read_manifest_rows(video_dir):
    import pyarrow as pa

    return pa.table({"path": [str(video_dir / "empty.mp4"), str(video_dir / "text.mp4")], "label": [0, 1]})


def test_resizing_once_per_video_gives_the_pixels_of_the_composed_transform():
    """Repeated augmentation resizes a decoded clip once and crops it k times: exactly what the one
    composed torchvision pipeline (resize, crop, flip, RandAugment) gives each replica."""
    import torch
    from torchvision.transforms import v2

    from conftest import make_clip
    from ppma_ray.data.randaug import VideoRandAugment
    from ppma_ray.data.transforms import CROP_RATIO, CROP_SCALE, RANDAUG_PROB, _to_numpy, _to_video

    clip_cfg = ClipConfig(img_size=32, short_side=40, flip=True)
    reference = v2.Compose([v2.Resize(40, antialias=True),
                            v2.RandomResizedCrop(32, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
                            v2.RandomHorizontalFlip(), VideoRandAugment(9, 2, prob=RANDAUG_PROB)])
    transform = TrainTransform(clip_cfg, randaug_ops=2, randaug_magnitude=9)
    frames = make_clip(num_frames=8, h=48, w=72)
    resized = transform.resize(frames)
    out = np.zeros((4, 8, 32, 32, 3), dtype=np.uint8)
    for seed in range(4):
        transform.augment(resized, seed=seed, out=out[seed])
        torch.manual_seed(seed)
        assert np.array_equal(out[seed], _to_numpy(reference(_to_video(frames))))
    assert len({o.tobytes() for o in out}) == 4  # four different replicas


def test_the_training_stream_stays_on_the_host_whatever_device_ray_train_gives_the_worker(ray_session, tiny_config,
                                                                                          monkeypatch):
    """Inside a Ray Train worker Ray Data would move batches to the worker's device ("auto": a GPU
    there); the stream asks for the host, where the failed clips are counted and dropped before
    the copy (here the worker's device is faked as ``meta``, which any tensor sent there shows)."""
    import ray.train.torch
    import ray.train.utils
    import torch

    from ppma_ray.train.data import EpochStream, resolve_sources
    from ppma_ray.train.runner import resolve_paths

    monkeypatch.setattr(ray.train.utils, "_in_ray_train_worker", lambda: True)  # what iter_torch_batches asks
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("meta"))
    cfg = resolve_paths(tiny_config("align.samples_per_epoch=32", "align.batch_size=8"))
    sources = [r.train for r in resolve_sources(cfg.data, cfg.align.source_names())]
    stream = EpochStream(sources, cfg.align, cfg.data.clip, cfg.data.decode, 0, 1, 0)
    epoch, step, batch = next(stream.iterate(0, 0, 1))
    assert (epoch, step) == (0, 0) and {v.device.type for v in batch.values()} == {"cpu"}
    assert batch["video"].shape == (8, 8, 32, 32, 3) and batch["video"].dtype == torch.uint8
