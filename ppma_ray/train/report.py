"""A run's results for people: the console table at its end, and the evaluation entries that
accumulate in an output folder's ``results.json`` and ``results.csv``."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from ppma_ray.files import locked, write_text_atomic

CSV_FIELDS = ["model", "task", "protocol", "top1", "top5", "videos", "failed", "wall_s", "checkpoint"]


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def print_results(results: dict) -> None:
    stages = results.get("stages", {})
    if stages:
        print("\n| stage | steps | final loss | val top-1 | clips/s | wall s | checkpoint |")
        print("|---|---|---|---|---|---|---|")
        for name, s in stages.items():
            val = ", ".join(f"{k} {v:.3f}" for k, v in (s.get("val_top1") or {}).items()) or "-"
            print(f"| {name} | {s['steps']} | {_fmt(s['final_loss'])} | {val} | {_fmt(s['clips_per_s'], '.1f')} "
                  f"| {_fmt(s['wall_s'], '.0f')} | {s['checkpoint']} |")
    evals = results.get("eval", [])
    if evals:
        print("\n| model | task | protocol | top-1 | top-5 |")
        print("|---|---|---|---|---|")
        for e in evals:
            print(f"| {e['model']} | {e['task']} | {e['protocol']} | {e['top1']:.3f} | {e['top5']:.3f} |")
        models = list(dict.fromkeys(e["model"] for e in evals))
        tasks = list(dict.fromkeys(e["task"] for e in evals))
        if len(models) > 1 and len(tasks) > 1:  # e.g. the ablation: one row per model, one column per task
            top1 = {(e["model"], e["task"]): e["top1"] for e in evals}
            print("\n| model | " + " | ".join(f"{t} top-1" for t in tasks) + " |")
            print("|---|" + "---|" * len(tasks))
            for m in models:
                print(f"| {m} | " + " | ".join(_fmt(top1.get((m, t)), ".3f") for t in tasks) + " |")


def write_results(out_dir: str | Path, entries: list[dict]) -> None:
    """Add ``entries`` to ``results.json`` (under ``eval``) and one row each to ``results.csv``.

    Several evaluations may finish into one folder at once: the read-modify-write holds a lock, and
    the file is replaced in one step, so no entry is lost and no reader sees a torn file. A
    ``results.json`` that does not parse (another tool's, or torn by an older version) is kept as
    ``results.json.unreadable`` and named, and a new one started: the new entries are not lost to it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    with locked(out / ".results.lock"):
        results = {}
        if path.is_file():
            try:
                results = json.loads(path.read_text())
                if not isinstance(results, dict) or not isinstance(results.get("eval", []), list):
                    raise ValueError("not a results.json of these jobs")
            except ValueError as e:
                kept = path.with_name(path.name + ".unreadable")
                os.replace(path, kept)
                print(f"warning: {path} could not be read ({str(e).splitlines()[0]}): kept as {kept}, "
                      "and a new results.json started", file=sys.stderr)
                results = {}
        results["eval"] = results.get("eval", []) + entries
        write_text_atomic(path, json.dumps(results, indent=2))
        table = out / "results.csv"
        new = not table.is_file()
        with open(table, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(entries)
