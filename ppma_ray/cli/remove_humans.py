"""Build a No-Human dataset: segment the people in every video and inpaint them away.

    python jobs/remove_humans.py MANIFEST --root DIR --out DIR [--segmenter torchvision] [--gpus-per-actor 1]

Ray Data streams the videos through a pool of segmenter actors (GPU or CPU); masks are thresholded
(--threshold 0.5) and dilated (3x3 cross, --dilate 4 iterations, as HAT); the people are removed by
temporal background propagation with global alignment, then spatial inpainting. Writes the mp4s
under OUT (same relative paths), OUT/manifest.csv (same labels), OUT/report.csv (person-pixel
fraction before/after, frames, seconds, error) and OUT/removal.json (which model removed the people:
``jobs/audit_privacy.py`` then audits with another family). A video that cannot be read is
reported; the rest go on.

--segmenter: torchvision[:ARCH][:WEIGHTS] (DeepLabV3, torchvision's DEFAULT weights, downloaded once
into the torch hub cache, or a local weights file), maskrcnn[:ARCH][:WEIGHTS] (Mask R-CNN),
colorkey:R,G,B, or package.module:Class.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from ppma_ray.cli import bad_input_exits, check_writable, number, parser
from ppma_ray.data.manifest import read_manifest

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
    with bad_input_exits():
        table = read_manifest(args.manifest, root=args.root)
        check_writable("--out", args.out)
        from ppma_ray.privacy.job import fetch_weights, remove_humans

        fetch_weights(args.segmenter)
    from ppma_ray.ray_env import init_ray

    init_ray(verbose=args.verbose)
    t0 = time.perf_counter()
    report = remove_humans(table, args.out, args.root, args.segmenter, args.threshold, args.dilate, args.fps,
                           args.actors, args.gpus_per_actor)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    rows = report.to_pylist()
    with open(out / "manifest.csv", "w") as f:
        f.writelines(f"{r['out_path']};{r['label']}\n" for r in rows if not r["error"])
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["line", "path", "out_path", "label", "frames", "person_frac_before",
                                          "person_frac_after", "seconds", "error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    failed = [r for r in rows if r["error"]]
    frames = sum(r["frames"] for r in rows)
    from ppma_ray.privacy.job import segmenter_family

    (out / REMOVAL_FILE).write_text(json.dumps({
        "segmenter": args.segmenter, "family": segmenter_family(args.segmenter), "threshold": args.threshold,
        "dilate": args.dilate, "manifest": str(Path(args.manifest).resolve()), "videos": len(rows) - len(failed)}, indent=2))
    print(f"{len(rows) - len(failed)} of {len(rows)} videos written to {out} ({frames} frames, {wall:.1f} s)")
    for r in failed:
        print(f"  failed line {r['line']}: {r['path']}: {r['error']}")
    print(f"wrote {out / 'manifest.csv'}, {out / 'report.csv'} and {out / REMOVAL_FILE}")
    return 1 if failed else 0

