"""The PPMA benchmark's datasets: class counts, storage and the shipped split files.

Split files live in ``ppma_ray/data/splits/<folder>/<split>.csv`` (see the README there for their
origin). Paths in them are relative to the dataset's root, which the user supplies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ppma_ray.data.config import SourceConfig
from ppma_ray.data.manifest import read_manifest

SPLITS_DIR = Path(__file__).parent / "splits"


@dataclass(frozen=True)
class DatasetInfo:
    """One benchmark dataset.

    ``storage`` is ``"video"`` (decoded by timestamps) or ``"frames"`` (a folder of JPEGs per video,
    read at the explicit ``fps`` because a folder carries no timing).
    """

    name: str
    num_classes: int
    storage: str
    folder: str
    splits: tuple[str, ...]
    missing_splits: tuple[str, ...] = ()
    fps: float | None = None
    role: str = "downstream"  # "downstream" | "pretrain"
    note: str = ""


CATALOG: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo("ucf101", 101, "frames", "ucf101", ("train", "val"), fps=25.0),
        DatasetInfo("hmdb51", 51, "frames", "hmdb51", ("train", "val"), fps=30.0),
        DatasetInfo("mini_ssv2", 87, "video", "mini_ssv2", ("val",), ("train",)),
        DatasetInfo("diving48", 48, "video", "diving48", ("train", "val"), note="label 30 never occurs in the V2 lists"),
        DatasetInfo("ikea_furniture", 12, "video", "ikea_furniture", ("train", "val")),
        DatasetInfo("uav", 155, "video", "uav", ("train", "val")),
        DatasetInfo("kinetics150", 150, "video", "kinetics150", ("val",), ("train",), role="pretrain"),
        DatasetInfo(
            "inpk150", 150, "frames", "inpk150", ("val",), ("train",), fps=25.0, role="pretrain",
            note="No-Human Kinetics-150; same label map as kinetics150",
        ),
        DatasetInfo(
            "sim150", 150, "video", "sim150", ("val",), ("train",), role="pretrain",
            note="Synthetic-150 (SynAPT); its 150 classes differ from Kinetics-150's",
        ),
    ]
}


def get_dataset(name: str) -> DatasetInfo:
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(CATALOG)}") from None


def split_file(name: str, split: str) -> Path:
    """Path of a shipped split file; a clear error for the lists the release does not include."""
    info = get_dataset(name)
    if split in info.missing_splits:
        raise FileNotFoundError(
            f"the {name} {split} list is not part of the PPMA release; pass your own manifest "
            f"(see ppma_ray/data/splits/README.md)"
        )
    if split not in info.splits:
        raise FileNotFoundError(f"{name} has no {split!r} split (has: {info.splits})")
    return SPLITS_DIR / info.folder / f"{split}.csv"


def load_split(name: str, split: str, root: str | None = None) -> pa.Table:
    """Read a shipped split as a canonical manifest table (see ``read_manifest``)."""
    return read_manifest(split_file(name, split), root=root)


def task_source(task: str, sources: dict[str, SourceConfig], task_root: str | None) -> SourceConfig:
    """The source (train list, test list, root, fps) of a downstream task: ``demo:<name>``, a
    catalog name (its shipped lists, the videos under ``task_root``), or a name in ``sources``."""
    if task.startswith("demo:"):
        return SourceConfig(manifest=task)
    if task in CATALOG:
        if task_root is None:
            raise ValueError(f"task {task!r} needs eval.task_root (jobs/evaluate.py: --task-root), the folder its videos are under")
        return SourceConfig(manifest=str(split_file(task, "train")), val_manifest=str(split_file(task, "val")),
                            root=task_root, fps=CATALOG[task].fps)
    if task in sources:
        return sources[task]
    raise KeyError(f"unknown task {task!r} (demo:<name>, a catalog name {sorted(CATALOG)}, or a name in data.sources)")


def task_name(task: str) -> str:
    """The source name a task's lists go by: ``demo:motion`` -> ``motion``."""
    return task.split(":", 1)[1] if task.startswith("demo:") else task
