"""Human removal and privacy audit as Ray Data jobs over a manifest.

Videos stream through an actor pool (one segmenter per actor, on a GPU when asked); each actor
decodes a whole video, segments every frame, removes the people (``inpaint.py``) and writes the
No-Human mp4, returning one report row. A video that cannot be read is reported and the rest go on.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from ppma_ray.config import ConfigError
from ppma_ray.data.video import VideoDecodeError, VideoSource, write_video
from ppma_ray.errors import one_line
from ppma_ray.files import write_text_atomic
from ppma_ray.privacy.inpaint import inpaint_video, person_mask


def torchvision_spec(spec: str) -> tuple[str, str, str] | None:
    """``torchvision[:ARCH][:WEIGHTS]`` or ``maskrcnn[:ARCH][:WEIGHTS]`` -> (kind, arch, weights: a
    torchvision weights name, ``none`` or a file; DEFAULT when left out); None for any other spec."""
    kind, _, rest = spec.partition(":")
    if kind not in ("torchvision", "maskrcnn"):
        return None
    from ppma_ray.privacy.segment import ARCHS, DETECTOR_ARCHS

    archs = ARCHS if kind == "torchvision" else DETECTOR_ARCHS
    parts = [p for p in rest.split(":") if p]
    arch = parts.pop(0) if parts and parts[0] in archs else archs[0]
    return kind, arch, parts[0] if parts else "DEFAULT"


def make_segmenter(spec: str):
    """``torchvision[:ARCH][:none|PATH]`` (a DeepLabV3 segmenter), ``maskrcnn[:ARCH][:none|PATH]``
    (a Mask R-CNN detector) -- DEFAULT weights unless ``none`` or a weights file --,
    ``colorkey:R,G,B``, or ``package.module:Class`` (constructed without arguments)."""
    if parsed := torchvision_spec(spec):
        from ppma_ray.privacy.segment import TorchvisionDetector, TorchvisionSegmenter

        kind, arch, weights = parsed
        build = TorchvisionSegmenter if kind == "torchvision" else TorchvisionDetector
        if weights == "none":
            return build(arch, weights=None)
        if os.path.exists(weights):
            return build(arch, weights=None, weights_path=weights)
        return build(arch, weights=weights)
    kind, _, rest = spec.partition(":")
    if kind == "colorkey":
        from ppma_ray.privacy.segment import ColorKeySegmenter

        return ColorKeySegmenter(tuple(int(c) for c in rest.split(",")) if rest else (255, 0, 255))
    module, _, cls = spec.rpartition(":")
    if not module:
        raise ValueError(f"unknown segmenter {spec!r}")
    return getattr(importlib.import_module(module), cls)()


def fetch_weights(spec: str) -> Path | None:
    """Before Ray starts: the named torchvision weights of a segmenter spec in this machine's torch hub
    cache (downloaded here once, where each actor would have fetched them), or a ``ConfigError``
    saying where to put them. Without it, an unknown weights name or a node without internet failed
    in every actor, a Ray traceback each. Returns the cached file (None: no named weights)."""
    parsed = torchvision_spec(spec)
    if parsed is None or parsed[2] == "none" or os.path.exists(parsed[2]):
        return None
    import torch
    from torchvision.models import get_model_weights

    kind, arch, name = parsed
    enum = get_model_weights(arch)
    if name not in enum.__members__:
        raise ConfigError(f"--segmenter {spec}: {name!r} is neither a weights file nor weights of {arch} "
                          f"({', '.join(enum.__members__)})")
    url = enum[name].url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        try:
            torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
        except Exception as e:  # offline, a proxy, a corrupt download
            raise ConfigError(f"--segmenter {spec}: {arch}'s {name} weights are not in the torch hub cache ({cached}) "
                              f"and could not be downloaded ({one_line(e, 120)}): "
                              f"put {os.path.basename(url)} there (on every node), or pass a weights file "
                              f"({kind}:{arch}:PATH)") from None
    return cached


def segmenter_family(spec: str) -> str:
    """The model family of a segmenter spec: two specs of one family (DeepLabV3 with another
    backbone, say) share their training data and blind spots, so one cannot audit the other."""
    kind = spec.partition(":")[0]
    return {"torchvision": "DeepLabV3 segmentation (torchvision)", "maskrcnn": "Mask R-CNN detection (torchvision)",
            "colorkey": "colour key"}.get(kind, spec)


def read_all_frames(path: str, fps: float | None = None) -> tuple[np.ndarray, float, str]:
    """Every frame, the frame rate, and why decord could not decode the file when ``auto`` gave it
    to PyAV (``VideoSource.fallback``; empty otherwise)."""
    with VideoSource(path, fps) as src:
        frames = src.get(np.arange(src.num_frames))
        return frames, src.fps, src.fallback or ""


class RemoveHumans:
    """Ray Data actor: one video per call -> the No-Human mp4 and a report row.

    A video counts as done only once both its mp4 and its row record are in place: the mp4 is
    written under a temporary name and renamed, then the record (the row and the settings that made
    it) is written in one step. A run killed mid-video leaves a ``.part`` file and no record, and
    the re-run does that video again."""

    def __init__(self, segmenter: str, out_dir: str, threshold: float, dilate: int, fps: float | None):
        self.segment = make_segmenter(segmenter)
        self.out_dir, self.threshold, self.dilate, self.fps = Path(out_dir), threshold, dilate, fps
        self.settings = removal_settings(segmenter, threshold, dilate, fps)

    def __call__(self, batch: dict) -> dict:
        rows = [self._one(str(p), str(o)) for p, o in zip(batch["path"], batch["out_path"])]
        return {**{k: np.asarray(v) for k, v in batch.items() if k != "out_path"},
                **{k: np.asarray([r[k] for r in rows], dtype=object if k in ("out_path", "error", "pyav_fallback") else None)
                   for k in rows[0]}}

    def _one(self, path: str, rel: str) -> dict:
        t0 = time.perf_counter()
        row = {"out_path": "", "frames": 0, "person_frac_before": np.nan, "person_frac_after": np.nan,
               "seconds": 0.0, "error": "", "pyav_fallback": ""}
        try:
            frames, fps, row["pyav_fallback"] = read_all_frames(path, self.fps)
            mask = person_mask(self.segment(frames), self.threshold, self.dilate)
            clean = inpaint_video(frames, mask)
            after = self.segment(clean) > self.threshold
            target = self.out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f".{target.stem}.part.mp4")  # .mp4: the container is taken from the name
            h, w = clean.shape[1] // 2 * 2, clean.shape[2] // 2 * 2  # H.264 wants even sizes
            write_video(part, np.ascontiguousarray(clean[:, :h, :w]), fps=fps)
            os.replace(part, target)
            row.update(out_path=rel, frames=len(frames), person_frac_before=float(mask.mean()),
                       person_frac_after=float(after.mean()))
        except VideoDecodeError as e:
            row["error"] = e.reason
        row["seconds"] = time.perf_counter() - t0
        if not row["error"]:
            record = _record_path(self.out_dir, rel)
            record.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(record, json.dumps({"path": path, "settings": self.settings, "row": row}))
        return row


RECORDS = ".done"  # under --out: one record per finished video, what a re-run skips


def removal_settings(segmenter: str, threshold: float, dilate: int, fps: float | None) -> dict:
    """What a No-Human video depends on besides its input: a re-run into the same folder must match."""
    return {"segmenter": segmenter, "threshold": threshold, "dilate": dilate, "fps": fps}


def _record_path(out_dir: Path, rel: str) -> Path:
    return Path(out_dir) / RECORDS / f"{rel}.json"


def output_paths(table: pa.Table, root: str | None, out_dir: str | Path) -> list[str]:
    """Each video's output path, relative to ``out_dir``: its path under ``root`` (its file name
    without one), as ``.mp4``. Checked before Ray starts, since each would lose or damage videos:
    two inputs with one output (``a.avi`` and ``a.mp4``; ``x/clip.mp4`` and ``y/clip.mp4`` without
    ``--root``; the later overwrote the earlier), an output that is its own input (``--out`` =
    ``--root``)."""
    out_dir = Path(out_dir).resolve()
    seen: dict[str, int] = {}
    rels = []
    for path, line in zip(table.column("path").to_pylist(), table.column("line").to_pylist()):
        rel = Path(os.path.relpath(path, root) if root else Path(path).name).with_suffix(".mp4").as_posix()
        rel = os.path.normpath(rel).replace(os.sep, "/")  # under out_dir: read_manifest refuses paths outside root
        if (out_dir / rel).resolve() == Path(path).resolve():
            raise ConfigError(f"line {line}: {path} would be overwritten by its own output: --out must be another folder")
        if rel in seen:
            raise ConfigError(f"lines {seen[rel]} and {line}: both videos would be written to {out_dir / rel}"
                              + ("" if root else " (pass --root to keep their folders)"))
        seen[rel] = line
        rels.append(rel)
    return rels


def finished_rows(out_dir: str | Path, paths: list[str], rels: list[str], settings: dict) -> dict[str, dict]:
    """The report rows of videos an earlier run into ``out_dir`` finished from the same inputs (by
    output path); any other video is done (again). Finished with other settings, they would mix two
    removals in one dataset: an error naming the change."""
    done = {}
    for path, rel in zip(paths, rels):
        record = _record_path(Path(out_dir), rel)
        if not record.is_file() or not (Path(out_dir) / rel).is_file():
            continue
        try:
            saved = json.loads(record.read_text())
            if saved["path"] != path:  # made from another input (another --root): done again
                continue
            changed = [f"{k} {saved['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
                       if saved["settings"].get(k) != v]
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a record of this job: done again
        if changed:
            raise ConfigError(f"--out {out_dir}: {rel} was made with other settings ({', '.join(changed)}): "
                              "use those, another --out, or delete the folder to start over")
        done[rel] = saved["row"]
    return done


class AuditFrames:
    """Ray Data actor: sampled frames of one video -> person statistics."""

    def __init__(self, segmenter: str, threshold: float, frames_per_video: int, min_person_frac: float, fps: float | None):
        self.segment = make_segmenter(segmenter)
        self.threshold, self.n, self.min_frac, self.fps = threshold, frames_per_video, min_person_frac, fps

    def __call__(self, batch: dict) -> dict:
        stats = {"sampled_frames": [], "frames_with_person": [], "person_pixel_frac": [], "error": []}
        for p in batch["path"]:
            try:
                with VideoSource(str(p), self.fps) as src:
                    idx = np.linspace(0, src.num_frames - 1, min(self.n, src.num_frames)).round().astype(np.int64)
                    frames = src.get(idx)
                person = self.segment(frames) > self.threshold
                per_frame = person.mean(axis=(1, 2))
                stats["sampled_frames"].append(len(idx))
                stats["frames_with_person"].append(int((per_frame > self.min_frac).sum()))
                stats["person_pixel_frac"].append(float(person.mean()))
                stats["error"].append("")
            except VideoDecodeError as e:
                for k, v in (("sampled_frames", 0), ("frames_with_person", 0), ("person_pixel_frac", np.nan), ("error", e.reason)):
                    stats[k].append(v)
        return {**{k: np.asarray(v) for k, v in batch.items()},
                **{k: np.asarray(v, dtype=object if k == "error" else None) for k, v in stats.items()}}


def _run(table: pa.Table, actor, kwargs: dict, num_actors: int, num_gpus: float) -> pa.Table:
    blocks = [table.slice(i, 1) for i in range(table.num_rows)]
    ds = ray.data.from_arrow(blocks).map_batches(
        actor, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=num_gpus or None, num_cpus=1,
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("line")


def remove_humans(table: pa.Table, out_dir: str | Path, root: str | None = None, segmenter: str = "torchvision",
                  threshold: float = 0.5, dilate: int = 4, fps: float | None = None, num_actors: int = 1,
                  num_gpus: float = 0.0) -> pa.Table:
    """Write No-Human versions of every video of ``table`` under ``out_dir`` (at ``output_paths``);
    returns the report."""
    kwargs = {"segmenter": segmenter, "out_dir": str(out_dir), "threshold": threshold, "dilate": dilate, "fps": fps}
    table = table.select(["path", "label", "line"])
    table = table.append_column("out_path", pa.array(output_paths(table, root, out_dir), pa.string()))
    return _run(table, RemoveHumans, kwargs, num_actors, num_gpus)


def audit(table: pa.Table, segmenter: str = "torchvision", threshold: float = 0.5, frames_per_video: int = 8,
          min_person_frac: float = 0.001, fps: float | None = None, num_actors: int = 1, num_gpus: float = 0.0) -> pa.Table:
    kwargs = {"segmenter": segmenter, "threshold": threshold, "frames_per_video": frames_per_video,
              "min_person_frac": min_person_frac, "fps": fps}
    return _run(table.select(["path", "label", "line"]), AuditFrames, kwargs, num_actors, num_gpus)
