"""From the config to per-rank batches: sources, epoch plans, Ray Data streams.

Each Ray Train worker builds the Ray Data stream of *its own* slice of the epoch plan, starting at
the step it resumes from. The plan is a pure function of (seed, epoch), so all ranks agree on it
without communication, each rank gets exactly ``steps_per_epoch`` batches (DDP all-reduces never
wait on a rank that ran out), and a resumed or restarted worker neither repeats nor skips samples.
The decode tasks are ordinary Ray Data tasks that Ray schedules on any node with free CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ppma_ray.data.config import ClipConfig, DataConfig, DecodeConfig
from ppma_ray.data.demo import make_demo
from ppma_ray.data.manifest import label_map_of, read_manifest
from ppma_ray.data.mixing import plan_epoch
from ppma_ray.data.pipeline import Source, build_dataset, build_eval_dataset, plan_to_table
from ppma_ray.train.config import StageConfig


@dataclass
class ResolvedSource:
    train: Source
    val: Source | None


def resolve_sources(data: DataConfig, names: list[str]) -> list[ResolvedSource]:
    """Read the manifests of ``names`` (generating the demo data for ``demo:<name>`` sources)."""
    out = []
    for name in names:
        if name not in data.sources:
            raise KeyError(f"mix names source {name!r}, but data.sources has {sorted(data.sources)}")
        sc = data.sources[name]
        if sc.manifest.startswith("demo:"):
            kind = sc.manifest.split(":", 1)[1]
            manifests = make_demo(data.demo_root, seed=data.demo_seed)
            if kind not in manifests:
                raise KeyError(f"data.sources.{name}.manifest: no demo set {kind!r} (have {sorted(manifests)})")
            root = str(Path(data.demo_root) / kind)
            train_m, val_m = manifests[kind]["train"], manifests[kind]["val"]
        else:
            root, train_m, val_m = sc.root, sc.manifest, sc.val_manifest
        train = Source(name, read_manifest(train_m, root=root, label_map=sc.label_map), fps=sc.fps)
        # named labels: the held-out list takes the training list's ids, whatever classes it holds
        labels = sc.label_map or label_map_of(train.table)
        val = Source(name, read_manifest(val_m, root=root, label_map=labels), fps=sc.fps) if val_m else None
        out.append(ResolvedSource(train, val))
    return out


class EpochStream:
    """The training batches of one rank, epoch by epoch.

    A step consumes ``batch_size / repeats`` videos globally, ``videos_per_rank`` of them on each
    rank; each video yields ``repeats`` clips.
    """

    def __init__(self, sources: list[Source], stage: StageConfig, clip: ClipConfig, decode: DecodeConfig,
                 seed: int, world: int, rank: int):
        self.sources, self.clip, self.decode, self.seed = sources, clip, decode, seed
        self.world, self.rank = world, rank
        self.stage = stage
        self.granularity = stage.granularity
        if stage.batch_size % (stage.repeats * world):  # also a config rule; a caller may pass its own world
            raise ValueError(f"batch_size {stage.batch_size} must be a multiple of repeats x workers = {stage.repeats * world}")
        self.videos_per_step = stage.batch_size // stage.repeats
        self.videos_per_rank = self.videos_per_step // world
        sizes = [s.table.num_rows for s in sources]
        trained = stage.trained_sources()
        clips = stage.samples_per_epoch or sum(n for n, s in zip(sizes, sources) if s.name in trained)
        self.steps_per_epoch = (clips // stage.repeats) // self.videos_per_step
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch of {clips} clips is less than one batch of {stage.batch_size}")
        self.sizes = sizes

    @property
    def videos_per_epoch(self) -> int:
        return self.steps_per_epoch * self.videos_per_step

    def rank_table(self, epoch: int, start_step: int = 0):
        """This rank's slots of ``epoch`` from ``start_step`` on, as a decode-ready table."""
        n = self.videos_per_epoch
        mix = self.stage.mix_at(epoch)
        weights = [mix.get(s.name, 0.0) for s in self.sources]
        if self.stage.mix_by == "sizes":
            weights = [float(n) if w > 0 else 0.0 for n, w in zip(self.sizes, weights)]
        plan = plan_epoch(self.sizes, weights, n, self.seed, epoch, self.granularity, self.videos_per_step)
        slots = np.arange(epoch * n, (epoch + 1) * n, dtype=np.int64)  # run-wide slot ids
        shape = (self.steps_per_epoch, self.world, self.videos_per_rank)
        mine = plan.reshape(*shape, 2)[start_step:, self.rank].reshape(-1, 2)
        my_slots = slots.reshape(shape)[start_step:, self.rank].reshape(-1)
        return plan_to_table(self.sources, mine, my_slots)

    def iterate(self, epoch: int, start_step: int, epochs: int, min_rows: int = 20_000, pin_memory: bool = False):
        """Yields ``(epoch, step_in_epoch, batch)`` from (epoch, start_step) to the end of training.

        Several short epochs share one Ray Data stream (at least ``min_rows`` slots per stream),
        so the pipeline neither restarts nor drains at every epoch boundary of a small dataset.
        batch: dict of CPU torch tensors (page-locked with ``pin_memory``, for a fast non-blocking
        copy): video (b, T, H, W, C) uint8, label, source, row, slot, ok. Always the host: inside a
        Ray Train worker Ray would otherwise move them to the worker's GPU ("auto"), before the
        failed clips are counted and dropped on the host.
        """
        per_stream = max(1, min_rows // max(1, self.steps_per_epoch * self.videos_per_rank))
        while epoch < epochs:
            last = min(epochs, epoch + per_stream)
            tables = [self.rank_table(e, start_step if e == epoch else 0) for e in range(epoch, last)]
            steps = [(e, i) for e in range(epoch, last) for i in range(start_step if e == epoch else 0, self.steps_per_epoch)]
            ds = build_dataset(pa.concat_tables(tables), self.clip, self.decode, self.seed, self.stage.repeats,
                               self.stage.randaug_ops, self.stage.randaug_magnitude)
            batches = ds.iter_torch_batches(batch_size=self.videos_per_rank * self.stage.repeats, drop_last=False,
                                            prefetch_batches=2, device="cpu", pin_memory=pin_memory)
            for (e, i), batch in zip(steps, batches):
                yield e, i, batch
            epoch, start_step = last, 0


def eval_stream(source: Source, clip: ClipConfig, decode: DecodeConfig, world: int, rank: int,
                num_clips: int = 1, num_crops: int = 1, batch_size: int = 8):
    """This rank's share of a validation list (every row exactly once across ranks)."""
    rows = np.arange(rank, source.table.num_rows, world, dtype=np.int64)
    table = plan_to_table([source], np.stack([np.zeros_like(rows), rows], 1))
    if table.num_rows == 0:
        return iter(())
    ds = build_eval_dataset(table, clip, decode, num_clips, num_crops)
    return ds.iter_torch_batches(batch_size=batch_size, drop_last=False, device="cpu")
