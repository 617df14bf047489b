"""Audit a dataset for people: how many sampled frames and pixels still show a person.

    python jobs/audit_privacy.py MANIFEST [--root DIR] [--frames-per-video 8] [--segmenter auto]

Runs a person model on evenly sampled frames of every video (Ray Data actor pool) and prints the
fraction of frames with a person (more than --min-person-frac of their pixels), the fraction of
person pixels, the worst videos and a verdict. Writes --out (default audit.csv) with one row per
video and, next to it, a JSON summary (audit.json).

The audit is independent of the removal: ``jobs/remove_humans.py`` records its model in
removal.json next to its manifest (or name it with --removed-by), and --segmenter auto (the
default) audits with the other family: Mask R-CNN detection (``maskrcnn``) after the DeepLabV3
segmenter (``torchvision``), DeepLabV3 after Mask R-CNN. A model of the removal's own family would
only confirm what it already removed: that is refused unless --allow-same-family, and the verdict
then says the audit is not independent.
"""

from __future__ import annotations

import json
from pathlib import Path

from ppma_ray.cli import bad_input_exits, check_writable, number, parser
from ppma_ray.cli.remove_humans import REMOVAL_FILE
from ppma_ray.config import ConfigError
from ppma_ray.data.manifest import read_manifest
from ppma_ray.errors import one_line
from ppma_ray.files import write_csv_atomic, write_text_atomic


def pick_auditor(requested: str, removed_by: str | None, allow_same_family: bool = False) -> tuple[str, bool]:
    """(The segmenter spec to audit with, whether it is independent of the removal's model)."""
    from ppma_ray.privacy.job import segmenter_family

    auditor = requested
    if requested == "auto":
        auditor = "torchvision" if removed_by and removed_by.partition(":")[0] == "maskrcnn" else "maskrcnn"
    if removed_by is None:
        return auditor, False
    same = segmenter_family(auditor) == segmenter_family(removed_by)
    if same and not allow_same_family:
        raise ConfigError(f"--segmenter {auditor}: the people were removed by {removed_by}, of the same family "
                          f"({segmenter_family(auditor)}); it would only confirm its own output. Audit with another family "
                          "(--segmenter auto picks one), or pass --allow-same-family")
    return auditor, not same


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, config=False)
    ap.add_argument("manifest")
    ap.add_argument("--root", default=None)
    ap.add_argument("--segmenter", default="auto",
                    help="auto (the family the removal did not use), torchvision[:ARCH][:WEIGHTS], maskrcnn[:ARCH][:WEIGHTS], "
                         "colorkey:R,G,B or package.module:Class")
    ap.add_argument("--removed-by", default=None,
                    help="the segmenter spec that removed the people (default: removal.json next to MANIFEST)")
    ap.add_argument("--allow-same-family", action="store_true",
                    help="audit with the removal's own model family (the verdict says it is not independent)")
    ap.add_argument("--threshold", type=number(float, ge=0, le=1), default=0.5)
    ap.add_argument("--frames-per-video", type=number(int, ge=1), default=8)
    ap.add_argument("--min-person-frac", type=number(float, ge=0, le=1), default=0.001)
    ap.add_argument("--fps", type=number(float, gt=0), default=None)
    ap.add_argument("--actors", type=number(int, ge=1), default=1)
    ap.add_argument("--gpus-per-actor", type=number(float, ge=0), default=0.0)
    ap.add_argument("--worst", type=number(int, ge=0), default=10)
    ap.add_argument("--out", default="audit.csv")
    args = ap.parse_args(argv)
    with bad_input_exits():
        table = read_manifest(args.manifest, root=args.root)
        record = Path(args.manifest).parent / REMOVAL_FILE
        removed_by = args.removed_by
        if removed_by is None and record.is_file():
            try:
                removed_by = json.loads(record.read_text(encoding="utf-8"))["segmenter"]
            except (ValueError, KeyError, TypeError) as e:  # edited by hand, or not the removal's
                raise ConfigError(f"{record}: unreadable, or without a segmenter ({one_line(e)}); name the removal's with "
                                  "--removed-by SPEC") from None
        auditor, independent = pick_auditor(args.segmenter, removed_by, args.allow_same_family)
        if Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out}: a folder; the audit writes a CSV file (and a JSON next to it)")
        check_writable("--out", Path(args.out).parent)
        from ppma_ray.privacy.job import audit, fetch_weights, segmenter_family

        fetch_weights(auditor)
    from ppma_ray.ray_env import init_ray

    init_ray(verbose=args.verbose)
    rows = audit(table, auditor, args.threshold, args.frames_per_video, args.min_person_frac, args.fps,
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
    print(f"removed by: {removed_by or 'unknown (no removal.json, no --removed-by)'}"
          f"{f' ({segmenter_family(removed_by)})' if removed_by else ''}; audited by: {auditor} ({segmenter_family(auditor)})")
    clean = with_person == 0 and len(ok) == len(rows)
    caveat = ("an independent audit" if independent else "NOT independent: the removal's own model family" if removed_by
              else "independence unknown: the removal's model is not recorded")
    print(f"verdict: {'clean' if clean else 'NOT clean'}: {with_person} of {frames} sampled frames show a person"
          f"{f', {len(rows) - len(ok)} videos unreadable' if len(ok) < len(rows) else ''} ({caveat})")
    summary = {"removed_by": removed_by, "audited_by": auditor, "independent": independent, "clean": clean,
               "videos": len(rows), "unreadable": len(rows) - len(ok), "sampled_frames": frames,
               "frames_with_person": with_person, "person_pixel_frac": pixels}
    write_text_atomic(Path(args.out).with_suffix(".json"), json.dumps(summary, indent=2))
    write_csv_atomic(args.out, ["line", "path", "sampled_frames", "frames_with_person", "person_pixel_frac", "error"], rows)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0

