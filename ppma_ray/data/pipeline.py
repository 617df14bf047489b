"""Ray Data input pipeline: plan -> decode + augment on CPU tasks -> uint8 clip batches.

Each plan slot (one video) is decoded once and augmented ``repeats`` times (PPMA's repeated
augmentation, k = 4 in stage 1), so one slot yields ``repeats`` clips. Decoding runs in Ray Data
tasks, which Ray may schedule on any node with free CPUs (CPU-only nodes included), separately
from the GPU workers that consume the batches.

The stages take the run's ``data.clip`` (``ClipConfig``) and ``data.decode`` (``DecodeConfig``)
settings as they are. A video that fails to decode is retried ``decode.max_retries`` times (with another window); if it still
fails its clips come out flagged ``ok == 0`` (zero pixels) instead of disappearing, so batch
alignment (single-source batches, equal batch counts across DDP ranks) is kept and the consumer
counts, reports and drops them (``FailureTracker``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from ppma_ray.data.config import ClipConfig, DecodeConfig
from ppma_ray.data.transforms import EvalTransform, TrainTransform
from ppma_ray.data.video import VideoDecodeError, VideoSource, even_windows, probe_video, random_window


@dataclass
class Source:
    """One manifest taking part in a mix. ``fps`` is for frame-folder videos."""

    name: str
    table: pa.Table
    fps: float | None = None


class DataFailureError(RuntimeError):
    """Too many videos failed to decode."""


def plan_to_table(sources: list[Source], plan: np.ndarray, slots: np.ndarray | None = None) -> pa.Table:
    """Join a ``(n, 2)`` plan with the manifests: one row per slot. ``slots`` (default 0..n-1) are
    the slots' run-wide ids, which seed each slot's randomness."""
    n = len(plan)
    paths = np.empty(n, dtype=object)
    labels = np.empty(n, dtype=np.int64)
    fps = np.full(n, np.nan)
    start = np.full(n, np.nan)
    end = np.full(n, np.nan)
    for k, src in enumerate(sources):
        sel = np.flatnonzero(plan[:, 0] == k)
        if not len(sel):
            continue
        rows = plan[sel, 1]
        t = src.table
        paths[sel] = np.asarray(t.column("path").to_pylist(), dtype=object)[rows]
        labels[sel] = t.column("label").to_numpy()[rows]
        if src.fps:
            fps[sel] = src.fps
        for col, arr in (("start_s", start), ("end_s", end)):
            if col in t.column_names:
                arr[sel] = t.column(col).to_numpy(zero_copy_only=False).astype(float)[rows]
    return pa.table({
        "slot": np.arange(n, dtype=np.int64) if slots is None else np.asarray(slots, dtype=np.int64),
        "source": plan[:, 0].astype(np.int64), "row": plan[:, 1].astype(np.int64),
        "path": pa.array(paths.tolist(), pa.string()), "label": labels,
        "fps": fps, "start_s": start, "end_s": end,
    })


def decode_batch(batch: dict[str, np.ndarray], clip: ClipConfig, seed: int, repeats: int = 1, max_retries: int = 2,
                 randaug_ops: int = 0, randaug_magnitude: float = 7, backend: str = "auto") -> dict[str, np.ndarray]:
    """``map_batches`` UDF: n slots -> n * repeats clips ``video: (n*k, T, S, S, C)`` uint8.

    ``ok``: 0 for the clips of a video that failed; ``fallback``: 1 for those of a video that
    ``auto`` decoded with PyAV because decord could not (``VideoSource.fallback``)."""
    transform = TrainTransform(clip, randaug_ops, randaug_magnitude)
    k, s = repeats, clip.img_size
    n = len(batch["slot"])
    video = np.zeros((n * k, clip.num_frames, s, s, 3), dtype=np.uint8)
    ok = np.ones(n * k, dtype=np.int64)
    fallback = np.zeros(n * k, dtype=np.int64)
    for i in range(n):
        slot = int(batch["slot"][i])
        rng = np.random.default_rng([seed, slot])
        frames = None
        for _ in range(1 + max_retries):
            try:
                with VideoSource(batch["path"][i], _opt(batch["fps"][i]), backend) as src:
                    frames = random_window(src, clip.num_frames, clip.clip_seconds, rng,
                                           _opt(batch["start_s"][i]), _opt(batch["end_s"][i]))
                    fallback[i * k:(i + 1) * k] = src.fallback is not None
                break
            except VideoDecodeError:
                continue
        if frames is None:
            ok[i * k:(i + 1) * k] = 0
            continue
        resized = transform.resize(frames)  # once per video: the k replicas share it
        for r in range(k):  # each replica gets its own crop, written straight into the output block
            transform.augment(resized, seed=int(rng.integers(2**62)), out=video[i * k + r])
    rep = lambda col: np.repeat(np.asarray(batch[col], dtype=np.int64), k)  # noqa: E731
    return {"video": video, "label": rep("label"), "source": rep("source"), "row": rep("row"),
            "slot": rep("slot"), "ok": ok, "fallback": fallback}


def _opt(x) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def decode_eval_batch(batch: dict[str, np.ndarray], clip: ClipConfig, num_clips: int,
                      num_crops: int, backend: str = "auto") -> dict[str, np.ndarray]:
    """Deterministic test views of each video: ``video: (n, num_clips * num_crops, T, S, S, C)``.

    A video that cannot be decoded is flagged ``ok == 0``: evaluation excludes and reports it,
    it is never replaced by another clip. ``fallback`` as in ``decode_batch``."""
    s, n = clip.img_size, len(batch["row"])
    views = EvalTransform(crop_size=s, num_crops=num_crops)
    video = np.zeros((n, num_clips * num_crops, clip.num_frames, s, s, 3), dtype=np.uint8)
    ok = np.ones(n, dtype=np.int64)
    fallback = np.zeros(n, dtype=np.int64)
    for i in range(n):
        try:
            with VideoSource(batch["path"][i], _opt(batch["fps"][i]), backend) as src:
                clips = even_windows(src, num_clips, clip.num_frames, clip.clip_seconds,
                                     _opt(batch["start_s"][i]), _opt(batch["end_s"][i]))
                fallback[i] = src.fallback is not None
        except VideoDecodeError:
            ok[i] = 0
            continue
        video[i] = np.concatenate([views(c) for c in clips])
    return {"video": video, "label": np.asarray(batch["label"], dtype=np.int64),
            "source": np.asarray(batch["source"], dtype=np.int64), "row": np.asarray(batch["row"], dtype=np.int64), "ok": ok,
            "fallback": fallback}


def _configure(decode: DecodeConfig) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # plan order = batch composition
    # Our plans are one operator (decode + augment). Ray Data's per-operator reservation (half the
    # budget set aside per operator, meant to balance multi-operator pipelines) kept that operator
    # at ~1.3 tasks in flight on 2 CPUs in our profile; without it the same budget is used by the
    # one operator (~1.9 in flight) and the object-store budget still bounds what runs ahead.
    ctx.op_resource_reservation_enabled = False
    if decode.cpu_limit is not None:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(cpu=decode.cpu_limit)


def task_rows(rows: int, decode: DecodeConfig, clips_per_video: int, parallel: int) -> int:
    """Videos per decode task: ``decode.videos_per_task``, but no more than spreads ``rows`` videos
    over the ``parallel`` tasks that can run at once (a short validation list still uses every CPU)."""
    return max(1, min(decode.videos_per_task(clips_per_video), -(-rows // max(1, parallel))))


def _parallel_tasks(decode: DecodeConfig) -> int:
    """Decode tasks that can run at once under ``decode``'s limits (at least 1: an autoscaling
    cluster may not have its CPU nodes yet). Before ``ray.init``, this machine's CPUs: Ray Data
    starts a local instance with all of them."""
    if decode.max_concurrency:
        return decode.max_concurrency
    cpus = decode.cpu_limit or (ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else os.cpu_count() or 1)
    return max(1, int(cpus // decode.num_cpus_per_task))


def _map(table: pa.Table, fn, fn_kwargs: dict, decode: DecodeConfig, clips_per_video: int) -> "ray.data.Dataset":
    _configure(decode)
    # one input block per task: no repartition (all-to-all) stage in front of the decode
    step = task_rows(table.num_rows, decode, clips_per_video, _parallel_tasks(decode))
    blocks = [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]
    return ray.data.from_arrow(blocks).map_batches(
        fn, fn_kwargs=fn_kwargs, batch_size=step, batch_format="numpy",
        num_cpus=decode.num_cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=decode.max_concurrency) if decode.max_concurrency else None,
    )


def build_dataset(plan_table: pa.Table, clip: ClipConfig, decode: DecodeConfig, seed: int, repeats: int = 1,
                  randaug_ops: int = 0, randaug_magnitude: float = 7) -> "ray.data.Dataset":
    """The Ray Dataset of augmented clips for the slots of ``plan_table``, in plan order:
    ``repeats`` clips per slot (repeated augmentation), each with its own crop (and RandAugment)."""
    kw = {"clip": clip, "seed": seed, "repeats": repeats, "max_retries": decode.max_retries,
          "randaug_ops": randaug_ops, "randaug_magnitude": randaug_magnitude, "backend": decode.backend}
    return _map(plan_table, decode_batch, kw, decode, clips_per_video=repeats)


def build_eval_dataset(table: pa.Table, clip: ClipConfig, decode: DecodeConfig, num_clips: int = 2,
                       num_crops: int = 3) -> "ray.data.Dataset":
    """Multi-view evaluation clips of every row of ``table`` (a ``plan_to_table`` table), in order."""
    kw = {"clip": clip, "num_clips": num_clips, "num_crops": num_crops, "backend": decode.backend}
    # Counted per decoded window, not per view: a window's crops are cheap, and tasks of 2 videos
    # (12 views each) read 8% fewer videos/s than tasks of 4 or 8 (bikes, 2 x 3 views, 2 cores).
    return _map(table, decode_eval_batch, kw, decode, clips_per_video=num_clips)


def decode_error(path: str, fps: float | None = None, backend: str = "auto") -> str:
    """Why a video failed, for the rejects list (whose path is a column of its own): the error of
    one more probe with the same backend, made by the process that counts the failure (failures
    are rare; the decode batches carry numbers only)."""
    try:
        probe_video(path, fps, backend)
    except VideoDecodeError as e:
        return e.reason.splitlines()[0][:300]
    return "no clip window could be decoded (the first and last frames can)"


class FailureTracker:
    """Decode failures judged per video: a video that fails counts once, however many clips
    (repeats, epochs) were drawn from it.

    The run stops only when the failure rate is *confidently* above ``max_failure_rate``: the
    lower end of a one-sided 99% Wilson interval of (failed videos / videos seen) must exceed it,
    and at least ``min_videos`` videos must have been seen. So one bad video among the first few
    never stops a run, 3% bad videos under a 5% limit train through, and a source whose every
    video fails stops after ``min_videos`` videos.

    The state (videos seen per source, rejected rows with their reason) is a plain dict of lists
    (``state_dict``) so that it goes into a checkpoint's ``train_state.pt`` and survives a resume;
    ``merge`` joins the trackers of several ranks.
    """

    Z = 2.326  # one-sided 99%

    def __init__(self, sources: list[Source], max_failure_rate: float = 0.05, min_videos: int = 50,
                 backend: str = "auto"):
        self.sources, self.max_failure_rate, self.min_videos = sources, max_failure_rate, min_videos
        self.backend = backend
        self.seen = [np.zeros(s.table.num_rows, dtype=bool) for s in sources]
        self.rejects: dict[tuple[int, int], str] = {}  # (source, row) -> reason
        self.fallbacks: set[tuple[int, int]] = set()  # (source, row) that ``auto`` decoded with PyAV
        self.failed_clips = 0
        self._noted = False

    def update(self, batch: dict) -> dict:
        """Count a batch and return it without its failed clips."""
        ok = np.asarray(batch["ok"]).astype(bool)
        src, row = np.asarray(batch["source"]), np.asarray(batch["row"])
        for k in np.unique(src).tolist():
            self.seen[k][row[src == k]] = True
        if "fallback" in batch:
            for i in np.flatnonzero(np.asarray(batch["fallback"]).astype(bool) & ok).tolist():
                self.fallbacks.add((int(src[i]), int(row[i])))
        if ok.all():
            return batch
        bad = np.flatnonzero(~ok)
        self.failed_clips += len(bad)
        for i in bad.tolist():
            key = (int(src[i]), int(row[i]))
            if key not in self.rejects:
                self.rejects[key] = decode_error(self.path(*key), self.sources[key[0]].fps, self.backend)
        self._check()
        keep = np.flatnonzero(ok)
        return {key: value[keep] for key, value in batch.items()}

    def failure_rate_bound(self) -> tuple[int, int, float]:
        """(videos seen, failed videos, lower 99% bound of the failure rate)."""
        n, k = sum(int(s.sum()) for s in self.seen), len(self.rejects)
        if n == 0:
            return 0, 0, 0.0
        p, z2 = k / n, self.Z**2
        lower = (p + z2 / (2 * n) - self.Z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
        return n, k, float(max(0.0, lower))

    def _check(self) -> None:
        n, k, lower = self.failure_rate_bound()
        if n >= self.min_videos and lower > self.max_failure_rate:
            raise DataFailureError(
                f"{k} of {n} videos failed to decode ({k / n:.1%}, at least {lower:.1%} with 99% confidence > "
                f"data.decode.max_failure_rate {self.max_failure_rate:.1%}); per source: {self.summary()}; "
                f"first rejected: {[self.path(s, r) for s, r in list(self.rejects)[:5]]}"
            )

    def path(self, source: int, row: int) -> str:
        return self.sources[source].table.column("path")[row].as_py()

    def summary(self) -> dict[str, dict[str, int]]:
        """``{source: {"videos": seen, "failed": failed}}``, videos counted once; with
        ``"decoded_by_pyav"`` where ``auto`` decoded some of them with PyAV."""
        failed = np.bincount([s for s, _ in self.rejects], minlength=len(self.sources))
        pyav = np.bincount([s for s, _ in self.fallbacks], minlength=len(self.sources))
        return {s.name: {"videos": int(seen.sum()), "failed": int(f), **({"decoded_by_pyav": int(p)} if p else {})}
                for s, seen, f, p in zip(self.sources, self.seen, failed, pyav)}

    def fallback_note(self) -> str | None:
        """One line, the first time a video needed ``auto``'s fallback to PyAV (then it is only
        counted): which video, and decord's error (from one more probe, as for the rejects)."""
        if self._noted or not self.fallbacks:
            return None
        self._noted = True
        s, r = min(self.fallbacks)
        try:
            why = probe_video(self.path(s, r), self.sources[s].fps, self.backend)["fallback"]
        except VideoDecodeError as e:
            why = e.reason
        return (f"note: {self.path(s, r)}: {why}; data.decode.backend auto decodes such videos with PyAV "
                f"({len(self.fallbacks)} so far; counted as decoded_by_pyav in data_failures.json)")

    def state_dict(self) -> dict:
        return {"seen": [np.flatnonzero(s).tolist() for s in self.seen],
                "rejects": [[s, r, reason] for (s, r), reason in sorted(self.rejects.items())],
                "fallbacks": sorted([s, r] for s, r in self.fallbacks),
                "failed_clips": self.failed_clips}

    def load_state_dict(self, state: dict) -> None:
        self.merge([state])
        self.failed_clips = state.get("failed_clips", 0)

    def merge(self, states: list[dict]) -> None:
        """Union with other trackers' videos (the same sources): another rank's, or a checkpoint's.
        ``failed_clips`` stays this process's own count."""
        for state in states:
            for k, rows in enumerate(state["seen"]):
                self.seen[k][np.asarray(rows, dtype=np.int64)] = True
            for s, r, reason in state["rejects"]:
                self.rejects.setdefault((int(s), int(r)), reason)
            self.fallbacks.update((int(s), int(r)) for s, r in state.get("fallbacks", []))  # older checkpoints: none

    def rejects_csv(self) -> str:
        """``source,row,path,reason`` of every rejected video (a header only when there is none)."""
        import csv
        import io

        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["source", "row", "path", "reason"])
        for (s, r), reason in sorted(self.rejects.items()):
            w.writerow([self.sources[s].name, r, self.path(s, r), reason])
        return out.getvalue()
