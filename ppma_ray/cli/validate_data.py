"""Check every video of a manifest before training on it.

    python jobs/validate_data.py MANIFEST --root DIR_OR_BUCKET_URI [--fps 25] [--out DIR]

Probes each row in parallel on Ray (open, count frames, decode first and last frame), prints a
summary, and writes ``OUT/clean.csv`` (the good rows, same ``path;label`` format, paths relative to
the root) and ``OUT/rejects.csv`` (line, path, reason for every bad row). Exit code 1 when any row
was rejected.
"""

from __future__ import annotations

from pathlib import Path

from ppma_ray.cli import bad_input_exits, check_writable, number, parser
from ppma_ray.config import ConfigError
from ppma_ray.data.manifest import read_manifest, relative_path, write_ppma_manifest
from ppma_ray.data.video import BACKENDS, backend_problem
from ppma_ray.files import write_csv_atomic


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, config=False)
    ap.add_argument("manifest")
    ap.add_argument("--root", default=None, help="directory or bucket URI (s3://, gs://) the manifest's relative paths are under")
    ap.add_argument("--fps", type=number(float, gt=0), default=None, help="frame rate of frame-folder videos (default 25)")
    ap.add_argument("--out", default="validated", help="output directory (default ./validated)")
    ap.add_argument("--num-cpus", type=number(int, ge=1), default=None, help="CPUs for a local Ray instance")
    ap.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="decoder to probe with (compare them on your files: the rejects may differ)")
    args = ap.parse_args(argv)

    with bad_input_exits():
        table = read_manifest(args.manifest, root=args.root)
        if problem := backend_problem(args.backend):
            raise ConfigError(f"--backend: {problem}")
        check_writable("--out", args.out)
    from ppma_ray.data.validate import validate_manifest
    from ppma_ray.ray_env import init_ray

    init_ray(num_cpus=args.num_cpus, verbose=args.verbose)
    clean, rejected = validate_manifest(table, fps=args.fps, backend=args.backend)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_ppma_manifest(clean, out / "clean.csv", root=args.root)
    write_csv_atomic(out / "rejects.csv", ["line", "path", "reason"],
                     [{**r, "path": relative_path(r["path"], args.root)} for r in rejected.select(["line", "path", "reason"]).to_pylist()])

    frames = clean.column("num_frames").to_pylist()
    print(f"{args.manifest}: {table.num_rows} rows, {clean.num_rows} ok, {rejected.num_rows} rejected")
    if frames:
        print(f"  frames per video: min {min(frames)}, median {sorted(frames)[len(frames) // 2]}, max {max(frames)}")
    if fallbacks := [r for r in clean.select(["line", "path", "fallback"]).to_pylist() if r["fallback"]]:
        first = fallbacks[0]
        print(f"  decord cannot decode {len(fallbacks)} of the ok rows; --backend auto decodes those with PyAV (in training too), "
              f"e.g. line {first['line']}: {first['path']}: {first['fallback']}")
    for row in rejected.select(["line", "path", "reason"]).to_pylist()[:20]:
        print(f"  rejected line {row['line']}: {row['path']}: {row['reason']}")
    if rejected.num_rows > 20:
        print(f"  ... {rejected.num_rows - 20} more in {out / 'rejects.csv'}")
    print(f"wrote {out / 'clean.csv'} and {out / 'rejects.csv'}")
    return 1 if rejected.num_rows else 0

