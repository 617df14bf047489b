"""Search the stage-2 mixing proportion and the weight-averaging coefficient with Ray Tune.

    python jobs/tune_mix.py [--config YAML] [--set key=value ...] [--output-dir DIR] [--stage1 CKPT]

Stage 1 runs once (or --stage1 gives its checkpoint); each trial runs stage 2 at its proportion p of
synthetic data and is scored by linear probes on the group-aware tuning splits of the tasks in
eval.tasks (never their test lists); then the p = 1 and p = 0 models are averaged at fixed and
learned alpha. With no arguments: the demo data and a small experiment (about 10 minutes on 2 cores).
--scheduler pbt instead trains a population whose p changes during stage 2 (Population Based
Training) and reports the best trial's p-schedule; best.yaml then replays it (align.mix_schedule).
Writes DIR/trials.csv, DIR/best.yaml (ready for jobs/pretrain.py) and DIR/tune.png; re-running the
same command resumes without re-running finished trials.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppma_ray.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--stage1", default=None, help="stage-1 checkpoint directory (skips running MAE)")
    ap.add_argument("--scheduler", choices=["none", "asha", "pbt"], default=None)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.scheduler:
            cfg.tune.scheduler = args.scheduler
        if cfg.tune.scheduler == "pbt":
            from ppma_ray.tune.pbt import check_pbt

            check_pbt(cfg)
        if not cfg.eval.tasks:
            raise ConfigError("eval.tasks: the tuning objective needs at least one downstream task")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ppma_ray.ray_env import init_ray
    from ppma_ray.tune.search import run_experiment, summary_table

    init_ray()
    out = Path(args.output_dir) if args.output_dir else Path(cfg.run.storage_path) / f"{cfg.run.name}-tune"
    result = run_experiment(cfg, out, stage1=args.stage1)
    print(summary_table(result["rows"]))
    pbt = [r for r in result["rows"] if r.get("p_schedule") and r.get("objective") is not None]
    if pbt:
        best = max(pbt, key=lambda r: r["objective"])
        print(f"best PBT trial {best['trial']}: p-schedule [from epoch, to epoch, p] {best['p_schedule']}, "
              f"trained by {best['lineage']}")
    print(f"wrote {out / 'trials.csv'}, {out / 'best.yaml'}, {out / 'tune.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
