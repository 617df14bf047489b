"""Paper-style table of downstream results.

    python jobs/report.py RUN_DIRS...

Reads each DIR/results.json ("eval" entries) and prints a markdown table: one row per pretraining
(model), columns task x {FT, LP}, and the mean over the filled cells.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ppma_ray.cli import parser


def table(entries: list[dict]) -> str:
    tasks = sorted({e["task"] for e in entries})
    protocols = [p for p in ("ft", "lp") if any(e["protocol"] == p for e in entries)]
    cols = [(t, p) for t in tasks for p in protocols]
    models = list(dict.fromkeys(e["model"] for e in entries))
    cell = {(e["model"], e["task"], e["protocol"]): e["top1"] for e in entries}  # later runs win
    lines = ["| pretraining | " + " | ".join(f"{t} {p.upper()}" for t, p in cols) + " | mean |",
             "|---|" + "---|" * (len(cols) + 1)]
    for m in models:
        vals = [cell.get((m, t, p)) for t, p in cols]
        filled = [v for v in vals if v is not None]
        mean = f"{100 * sum(filled) / len(filled):.1f}" if filled else "-"
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals) + f" | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, config=False, uses_ray=False)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a directory with results.json, or the file itself")
    args = ap.parse_args(argv)
    entries = []
    for d in args.runs:
        path = Path(d) / "results.json" if Path(d).is_dir() else Path(d)
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        try:
            results = json.loads(path.read_text())
            found = results.get("eval", []) if isinstance(results, dict) else None
            if not isinstance(found, list) or not all(isinstance(e, dict) and {"model", "task", "protocol", "top1"} <= e.keys()
                                                     for e in found):
                raise ValueError("not a results.json of these jobs (its \"eval\" entries name model, task, protocol, top1)")
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            print(f"error: {path}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        entries += found
    if not entries:
        print("error: no evaluation entries found", file=sys.stderr)
        return 2
    print(table(entries))
    return 0
