"""The data section of a run (``data:``): video sources, clip geometry, decode scheduling.

The Ray Data pipeline, the transforms and the jobs take these classes directly: one class per
setting group, no parallel copies to keep in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ppma_ray.schema import ConfigError, option


# Who appears in a source's videos: what an exported model card states about its pretraining data
Humans = Literal["unknown", "removed", "synthetic", "none", "real"]


@dataclass
class SourceConfig:
    """A video collection. ``manifest: demo:<name>`` uses the generated demo set of that name."""

    manifest: str = ""
    root: str | None = option(None, help="relative paths in the manifest are under this directory or bucket URI (s3://, gs://)")
    val_manifest: str | None = option(None, help="held-out rows, for per-source validation in stage 2")
    fps: float | None = option(None, gt=0, help="frame rate of frame-folder videos")
    label_map: str | None = option(None, help="JSON {class name: id} for manifests with named labels (default: "
                                   "the sorted names of the training list; the job writes the map it used)")
    humans: Humans = option("unknown", help="who appears in the videos, stated in exported model cards: removed (real "
                            "footage, people removed), synthetic (virtual humans only), none, real, unknown")


@dataclass
class ClipConfig:
    """How a video becomes a clip (PPMA §2.5: 16 frames over 2.7 s, short side 256, crop 224)."""

    num_frames: int = option(16, ge=1, help="frames per clip")
    clip_seconds: float = option(2.7, gt=0, help="the window the frames are spread over")
    img_size: int = option(224, ge=1, help="crop size fed to the model")
    short_side: int = option(256, ge=1, help="resize before cropping")
    flip: bool = option(False, help="random horizontal flip (PPMA: off, it swaps left/right motions)")

    def check(self) -> None:
        if self.short_side < self.img_size:
            raise ConfigError.at("short_side", f"{self.short_side} is smaller than img_size {self.img_size}")


# Ray spends about 12 ms of CPU per decode task outside the task itself (the driver's streaming
# executor, the raylet's lease, the block's metadata and stats), whatever the task's size. On 2 cores
# with tasks of 4 videos (0.3 s of bikes.mp4 at k = 1) that took 0.18 of the 2 cores from decoding
# (Ray / DataLoader 0.95-1.05 over five runs); with 16 videos, 0.12 (0.98-1.11, the same rounds).
# Counted in clips, not videos, so a task's output (16 clips, ~38 MB at 16x224^2) stays the same
# size at k = 4 repeats, where tasks of 16 videos (154 MB) were no faster. Evaluation counts a
# video's decoded windows, not its crops (``build_eval_dataset``).
CLIPS_PER_TASK = 16

DecodeBackend = Literal["auto", "decord", "pyav", "torchcodec"]


@dataclass
class DecodeConfig:
    """Ray Data scheduling of the decode + augment tasks, which decoder they use, and what a failed
    decode costs."""

    backend: DecodeBackend = option("auto", help="video decoder: auto (decord where it installs, else PyAV), decord, "
                                                 "pyav or torchcodec (needs a system FFmpeg)")

    num_cpus_per_task: float = option(1.0, gt=0, help="CPUs Ray reserves per decode task")
    max_concurrency: int | None = option(None, ge=1, help="decode tasks in flight (null: as many as CPUs allow)")
    rows_per_task: int | None = option(None, ge=1, help="videos per decode task (null: 16 clips' worth, 16 // clips per "
                                                         "video, and no more than spreads the videos over every CPU)")
    cpu_limit: float | None = option(None, gt=0, help="CPUs Ray Data may use (null: cluster CPUs minus the trainers')")
    max_retries: int = option(2, ge=0, help="new windows tried before a video counts as failed")
    max_failure_rate: float = option(0.05, ge=0, le=1, help="failed videos above this fraction (99% confident, after "
                                                          "50 videos) stop the run")

    def videos_per_task(self, clips_per_video: int) -> int:
        """Videos one decode task decodes: ``rows_per_task``, or ``CLIPS_PER_TASK`` clips' worth."""
        return self.rows_per_task or max(1, CLIPS_PER_TASK // clips_per_video)

    def with_budget(self, cpus: float | None) -> "DecodeConfig":
        """These settings with ``cpus`` as Ray Data's CPU cap, unless ``cpu_limit`` sets one."""
        return self if self.cpu_limit else replace(self, cpu_limit=cpus)

    def per_rank(self, world: int) -> "DecodeConfig":
        """One training rank's share of the cap: every rank runs its own Ray Data executor, and
        ``world`` executors each allowed the whole budget would oversubscribe the decode CPUs
        ``world`` times (at least one task's CPUs each, so every rank makes progress)."""
        if self.cpu_limit is None or world == 1:
            return self
        return replace(self, cpu_limit=max(self.num_cpus_per_task, self.cpu_limit / world))


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = option(default_factory=dict, help="name -> a video source (its keys below)")
    demo_root: str = option("demo_data", help="where the generated demo sets are written")
    demo_seed: int = option(0, help="seed of the generated demo sets")
    clip: ClipConfig = field(default_factory=ClipConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
