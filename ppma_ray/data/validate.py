"""Probe every row of a manifest in parallel on Ray Data and split it into clean and rejected rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ppma_ray.data.video import VideoDecodeError, probe_video


def _probe_batch(batch: dict[str, np.ndarray], fps: float | None, backend: str = "auto") -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` UDF: one probe per row, never raises for a bad video."""
    n = len(batch["path"])
    frames = np.zeros(n, dtype=np.int64)
    reasons, fallbacks = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            probe = probe_video(str(path), fps=fps, backend=backend)
        except VideoDecodeError as e:
            reasons[i] = e.reason
        else:
            frames[i], fallbacks[i] = probe["num_frames"], probe["fallback"] or ""
    return {**batch, "num_frames": frames, "reason": reasons, "fallback": fallbacks}


def validate_manifest(
    table: pa.Table, fps: float | None = None, batch_size: int = 8, backend: str = "auto"
) -> tuple[pa.Table, pa.Table]:
    """Probe each row (open, count frames, decode first and last frame).

    Returns ``(clean, rejected)``: ``clean`` is ``table``'s good rows in their original order with a
    ``num_frames`` column and a ``fallback`` one (why decord could not decode a row that ``auto``
    decodes with PyAV; empty for the others); ``rejected`` has the bad rows with a ``reason`` column.
    """
    ds = ray.data.from_arrow(table).map_batches(
        _probe_batch, fn_kwargs={"fps": fps, "backend": backend}, batch_size=batch_size, batch_format="numpy"
    )
    probed = pa.concat_tables(ray.get(ds.to_arrow_refs())) if table.num_rows else table
    probed = probed.sort_by("line")  # Ray Data may reorder blocks; keep the manifest's order
    ok = pc.equal(probed.column("reason"), "")
    clean = probed.filter(ok).drop_columns(["reason"])
    rejected = probed.filter(pc.invert(ok)).drop_columns(["num_frames", "fallback"])
    return clean, rejected
