"""Search the stage-2 mixing proportion and the weight-averaging coefficient with Ray Tune.

    python jobs/tune_mix.py [--config YAML] [--set key=value ...] [--output-dir DIR] [--stage1 CKPT] [--scheduler none|asha|pbt]

Stage 1 runs once (or --stage1 gives its checkpoint or run folder); each trial runs stage 2 at its proportion p of
synthetic data and is scored by linear probes on the group-aware tuning splits of the tasks in
eval.tasks (never their test lists); then the p = 1 and p = 0 models are averaged at fixed and
learned alpha. With no arguments: the demo data and a small experiment (about 10 minutes on 2 cores).
--scheduler pbt instead trains a population whose p changes during stage 2 (Population Based
Training) and reports the best trial's p-schedule; best.yaml then replays it (align.mix_schedule).
Writes DIR/trials.csv, DIR/best.yaml (ready for jobs/pretrain.py) and DIR/tune.png; re-running the
same command resumes without re-running finished trials.
"""

from __future__ import annotations

from ppma_ray.cli import (bad_input_exits, check_manifests_exist, check_not_running, check_resume_config, check_storage,
                          check_tasks, check_weights, finish_config, output_dir, parser, read_config,
                          stage_failure_exits, start_ray, weights_source)
from ppma_ray.models.errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--stage1", default=None, help="stage-1 weights (skips running MAE): a checkpoint, or a run "
                    "folder such as runs/demo-mae (its newest whole checkpoint)")
    ap.add_argument("--scheduler", choices=["none", "asha", "pbt"], default=None, help="sets tune.scheduler")
    args = ap.parse_args(argv)
    with bad_input_exits(CheckpointError):
        cfg = read_config(args)
        if args.scheduler:
            cfg.tune.scheduler = args.scheduler
        cfg = finish_config(args, cfg)
        from ppma_ray.tune.checks import check, check_restore  # no Ray: the experiments import Ray Tune and torch

        check(cfg)
        check_manifests_exist(cfg, ("align",) if args.stage1 else ("mae", "align"))
        check_tasks(cfg, cfg.eval.tasks, test_lists=False)  # the objective splits each task's training list
        check_storage(cfg)
        if not args.stage1:  # the job runs stage 1 itself: a re-run continues <run.name>-mae
            check_resume_config(cfg, ("mae",))
        check_not_running(cfg, [f"{cfg.run.name}-tune", *([] if args.stage1 else [f"{cfg.run.name}-mae"])])
        out = output_dir(args.output_dir, cfg, "-tune")
        if args.stage1:
            args.stage1 = weights_source("--stage1", args.stage1)
        check_weights(cfg, args.stage1)  # the trunk must load whole, as in every trial
        check_restore(cfg, args.stage1)

    from ppma_ray.tune.outputs import summary_table
    from ppma_ray.tune.search import run_experiment

    cfg = start_ray(cfg, args.verbose)
    with stage_failure_exits():  # stage 1 failed, or another job took the run meanwhile: one line
        result = run_experiment(cfg, out, stage1=args.stage1)
    print(summary_table(result["rows"]))
    pbt = [r for r in result["rows"] if r.get("p_schedule") and r.get("objective") is not None]
    if pbt:
        best = max(pbt, key=lambda r: r["objective"])
        print(f"best PBT trial {best['trial']}: p-schedule [from epoch, to epoch, p] {best['p_schedule']}, "
              f"trained by {best['lineage']}")
    print(f"wrote {out / 'trials.csv'}, {out / 'best.yaml'}, {out / 'tune.png'}")
    return 0

