"""Files every experiment writes: ``trials.csv``, ``best.yaml`` / ``best.json``, and the console table."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ppma_ray.config import PretrainConfig, apply_override, to_dict
from ppma_ray.files import write_csv_atomic, write_text_atomic


def write_csv(path: Path, rows: list[dict]) -> None:
    """Every key of every row a column, in first-seen order."""
    write_csv_atomic(path, list(dict.fromkeys(k for r in rows for k in r)), rows)


def scored(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("objective") is not None]


def write_best(cfg: PretrainConfig, out: Path, best: dict, best_mix: dict, mix: dict, mix_schedule: list | None,
               header: list[str]) -> None:
    """``best.yaml``: the run's config with the winning stage-2 mix (and schedule), ready for
    ``jobs/pretrain.py``, under a header that says which trial won and why; ``best.json``: its row."""
    data = to_dict(cfg)
    data["align"]["mix"] = mix
    if mix_schedule is not None:  # None: the run's own schedule stays
        data["align"]["mix_schedule"] = mix_schedule
    for key in cfg.tune.extra:
        apply_override(data, f"{key}={best_mix[key]}")
    lines = [f"# best trial: {best['trial']} ({best['phase']}), objective {best['objective']:.4f}", *header,
             "# ready for: python jobs/pretrain.py --config best.yaml"]
    write_text_atomic(out / "best.yaml", "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False))
    write_text_atomic(out / "best.json", json.dumps(best, indent=2))


def summary_table(rows: list[dict]) -> str:
    tasks = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("lp_top1/")})
    lines = ["| phase | trial | p | alpha | " + " | ".join(f"LP {t}" for t in tasks) + " | objective | status |",
             "|---" * (6 + len(tasks)) + "|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['phase']} | {r['trial'][:24]} | {fmt(r.get('p'))} | {fmt(r.get('alpha'))} | "
                     + " | ".join(fmt(r.get(f"lp_top1/{t}")) for t in tasks) + f" | {fmt(r.get('objective'))} | {r['status']} |")
    return "\n".join(lines)
