"""Audit a dataset for people: how many sampled frames and pixels still show a person.

    python jobs/audit_privacy.py MANIFEST [--root DIR] [--frames-per-video 8] [--segmenter torchvision]

Runs the person segmenter on evenly sampled frames of every video (Ray Data actor pool) and prints
the fraction of frames with a person (more than --min-person-frac of their pixels), the fraction of
person pixels, and the worst videos. Writes --out (default audit.csv) with one row per video.
"""

from __future__ import annotations

import csv

from ppma_ray.cli import bad_input_exits, parser
from ppma_ray.data.manifest import read_manifest


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, config=False)
    ap.add_argument("manifest")
    ap.add_argument("--root", default=None)
    ap.add_argument("--segmenter", default="torchvision")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--frames-per-video", type=int, default=8)
    ap.add_argument("--min-person-frac", type=float, default=0.001)
    ap.add_argument("--fps", type=float, default=None)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--worst", type=int, default=10)
    ap.add_argument("--out", default="audit.csv")
    args = ap.parse_args(argv)
    with bad_input_exits():
        table = read_manifest(args.manifest, root=args.root)
    from ppma_ray.privacy.job import audit
    from ppma_ray.ray_env import init_ray

    init_ray()
    rows = audit(table, args.segmenter, args.threshold, args.frames_per_video, args.min_person_frac, args.fps,
                 args.actors, args.gpus_per_actor).to_pylist()
    ok = [r for r in rows if not r["error"]]
    frames = sum(r["sampled_frames"] for r in ok)
    with_person = sum(r["frames_with_person"] for r in ok)
    pixels = sum(r["person_pixel_frac"] * r["sampled_frames"] for r in ok) / max(1, frames)
    print(f"{len(ok)} videos audited ({len(rows) - len(ok)} unreadable), {frames} frames sampled")
    print(f"frames showing a person: {with_person / max(1, frames):.2%}; person pixels: {pixels:.3%}")
    print("worst videos:")
    for r in sorted(ok, key=lambda r: -r["person_pixel_frac"])[:args.worst]:
        print(f"  {r['person_pixel_frac']:.3%} pixels, {r['frames_with_person']}/{r['sampled_frames']} frames  {r['path']}")
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["line", "path", "sampled_frames", "frames_with_person", "person_pixel_frac", "error"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")
    return 0

