"""Build a No-Human dataset: segment the people in every video and inpaint them away.

    python jobs/remove_humans.py MANIFEST --root DIR --out DIR [--segmenter torchvision] [--gpus-per-actor 1]

Ray Data streams the videos through a pool of segmenter actors (GPU or CPU); masks are thresholded
(--threshold 0.5) and dilated (3x3 cross, --dilate 4 iterations, as HAT); the people are removed by
temporal background propagation with global alignment, then spatial inpainting. Writes the mp4s
under OUT (same relative paths), OUT/manifest.csv (same labels), OUT/report.csv (person-pixel
fraction before/after, frames, seconds, error, and pyav_fallback: decord's error for a video it could
not decode, which PyAV decoded) and OUT/removal.json (which model removed the people:
``jobs/audit_privacy.py`` then audits with another family). A video that cannot be read is
reported; the rest go on.

Re-running the same command into the same OUT continues an interrupted run: a video whose mp4 and
record (OUT/.done/) an earlier run finished is kept, not redone; a video cut off mid-write is done
again. A re-run with another --segmenter, --threshold, --dilate or --fps is refused, rather than mix
two removals in one dataset. Two inputs with one output path, or an output that would replace
its own input, are refused before Ray starts.

--segmenter: torchvision[:ARCH][:WEIGHTS] (DeepLabV3, torchvision's DEFAULT weights, downloaded once
into the torch hub cache, or a local weights file), maskrcnn[:ARCH][:WEIGHTS] (Mask R-CNN),
colorkey:R,G,B, or package.module:Class.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pyarrow as pa

from ppma_ray.cli import bad_input_exits, check_writable, number, parser
from ppma_ray.config import ConfigError
from ppma_ray.data.manifest import read_manifest
from ppma_ray.files import InUse, exclusive, write_csv_atomic, write_text_atomic

REMOVAL_FILE = "removal.json"  # next to the No-Human manifest: which model removed the people


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, config=False)
    ap.add_argument("manifest")
    ap.add_argument("--root", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--segmenter", default="torchvision")
    ap.add_argument("--threshold", type=number(float, ge=0, le=1), default=0.5)
    ap.add_argument("--dilate", type=number(int, ge=0), default=4)
    ap.add_argument("--fps", type=number(float, gt=0), default=None, help="frame rate of frame-folder videos")
    ap.add_argument("--actors", type=number(int, ge=1), default=1)
    ap.add_argument("--gpus-per-actor", type=number(float, ge=0), default=0.0)
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as held:  # the output folder, for the whole job (below)
        with bad_input_exits():
            table = read_manifest(args.manifest, root=args.root)
            check_writable("--out", args.out)
            try:  # two removals into one --out would write the same .part files and records at once
                held.enter_context(exclusive(Path(args.out) / ".removal.lock", str(Path(args.out).resolve())))
            except InUse as e:
                raise ConfigError(f"--out {e}: wait for it to finish, or use another --out") from None
            from ppma_ray.privacy.job import fetch_weights, finished_rows, output_paths, removal_settings

            rels = output_paths(table, args.root, args.out)
            done = finished_rows(args.out, table.column("path").to_pylist(), rels,
                                 removal_settings(args.segmenter, args.threshold, args.dilate, args.fps))
            if len(done) < len(rels):
                fetch_weights(args.segmenter)
        return _remove(args, table, rels, done)


def _remove(args, table: pa.Table, rels: list[str], done: dict) -> int:
    """The removal of the videos not ``done`` by an earlier run, then the dataset's files."""
    from ppma_ray.privacy.job import RECORDS, remove_humans, segmenter_family

    out = Path(args.out)
    if done:
        print(f"{len(done)} of {len(rels)} videos were finished by an earlier run into {out} "
              f"(records in {out / RECORDS}): kept, not redone")
    t0 = time.perf_counter()
    rows = [{**r, **done[rel]} for r, rel in zip(table.select(["path", "label", "line"]).to_pylist(), rels) if rel in done]
    todo = table.filter(pa.array([rel not in done for rel in rels]))
    if todo.num_rows:
        from ppma_ray.ray_env import init_ray

        init_ray(verbose=args.verbose)
        rows += remove_humans(todo, out, args.root, args.segmenter, args.threshold, args.dilate, args.fps, args.actors,
                              args.gpus_per_actor).to_pylist()
    wall = time.perf_counter() - t0
    rows.sort(key=lambda r: r["line"])
    # replaced in one step: a torn manifest.csv would be a smaller dataset that looks whole
    write_text_atomic(out / "manifest.csv", "".join(f"{r['out_path']};{r['label']}\n" for r in rows if not r["error"]))
    write_csv_atomic(out / "report.csv", ["line", "path", "out_path", "label", "frames", "person_frac_before",
                                          "person_frac_after", "seconds", "error", "pyav_fallback"], rows)
    failed = [r for r in rows if r["error"]]
    frames = sum(r["frames"] for r in rows)
    write_text_atomic(out / REMOVAL_FILE, json.dumps({
        "segmenter": args.segmenter, "family": segmenter_family(args.segmenter), "threshold": args.threshold,
        "dilate": args.dilate, "manifest": str(Path(args.manifest).resolve()), "videos": len(rows) - len(failed)}, indent=2))
    print(f"{len(rows) - len(failed)} of {len(rows)} videos written to {out} ({frames} frames, {wall:.1f} s)")
    for r in failed:
        print(f"  failed line {r['line']}: {r['path']}: {r['error']}")
    if pyav := [r for r in rows if r.get("pyav_fallback")]:  # records of earlier runs may lack the key
        print(f"  decord could not decode {len(pyav)} of the videos; PyAV decoded them (report.csv, pyav_fallback), "
              f"e.g. line {pyav[0]['line']}: {pyav[0]['path']}: {pyav[0]['pyav_fallback']}")
    print(f"wrote {out / 'manifest.csv'}, {out / 'report.csv'} and {out / REMOVAL_FILE}")
    return 1 if failed else 0
