"""Downstream evaluation: linear probe or fine-tuning of a pretrained trunk on a task.

    python jobs/evaluate.py --checkpoint runs/demo-align --task demo:motion --protocol lp [--cache-features]
    python jobs/evaluate.py --checkpoint A B --alpha 0.5 --task ucf101 --task-root /data/ucf101 --protocol ft
    python jobs/evaluate.py --checkpoint A B --learned-alpha --task demo:motion --protocol lp
    python jobs/evaluate.py --task mydata --train-manifest train.csv --val-manifest test.csv --root /videos

--checkpoint: a run directory (its newest checkpoint), a checkpoint or Hugging Face VideoMAE folder, a
Hub id hf://ORG/NAME[@REVISION], a checkpoint in a bucket (s3://...), or a weights file (.safetensors,
.bin, a VideoMAE .pth, a released PPMA .pt); none = random init; several, or the released ensemble
file = weight averaging (fixed --alpha, one per model or one for the first of two; or --learned-alpha
with the linear probe). A checkpoint that lacks a tensor the model needs is an error naming it.
Testing: 2 clips x 3 crops per video, softmax averaged; undecodable test videos are excluded and
reported, never replaced. Writes DIR/results.json (entries under "eval") and appends DIR/results.csv.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path

from ppma_ray.cli import (bad_input_exits, check_epoch, check_not_running, check_storage, check_tasks, finish_config,
                          number, output_dir, parser, read_config, stage_failure_exits, start_ray, weights_source)
from ppma_ray.config import ConfigError, SourceConfig
from ppma_ray.data.catalog import task_name
from ppma_ray.models.errors import CheckpointError
from ppma_ray.train.config import coefficients, evaluation_run_name, probe_on_cached_features


def default_model_name(checkpoints: list[str], n_models: int, alphas: list[float] | None, learned: bool,
                       per_layer: bool) -> str:
    """The results row, and the run folder, of an evaluation without ``--model-name``: the checkpoint's
    name, ``random_init``, or for an average its coefficients (``avg-0.25-0.75``, ``avg-learned``),
    so that each alpha of a sweep gets its own row and run folder."""
    if not checkpoints:
        return "random_init"
    if n_models == 1:
        return Path(checkpoints[0]).name
    if learned:
        return "avg-learned" + ("-per-layer" if per_layer else "")
    return "avg-" + "-".join(f"{a:g}" for a in coefficients(alphas, n_models))


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--checkpoint", nargs="*", default=[])
    ap.add_argument("--task", required=True, help="demo:<name>, a catalog name (ucf101, ...), or a new name with --train-manifest")
    ap.add_argument("--protocol", choices=["lp", "ft"], default="lp")
    ap.add_argument("--cache-features", action="store_true", help="LP on features extracted once (Ray Data)")
    ap.add_argument("--alpha", type=number(float), nargs="+", default=None,
                    help="fixed averaging coefficients: one per model, or one (the first's) for two")
    ap.add_argument("--learned-alpha", action="store_true", help="learn the averaging coefficients with the LP head")
    ap.add_argument("--per-layer", action="store_true", help="one learned coefficient set per parameter tensor")
    ap.add_argument("--model-name", default=None, help="row name in the results (default: from the checkpoint)")
    ap.add_argument("--train-manifest")
    ap.add_argument("--val-manifest")
    ap.add_argument("--root")
    ap.add_argument("--task-root", help="video directory of a catalog task")
    ap.add_argument("--num-classes", type=number(int, ge=1), default=None)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)
    with bad_input_exits():
        cfg = read_config(args)
        if args.train_manifest and not args.val_manifest:
            raise ConfigError("--train-manifest: the task needs its test list too (--val-manifest)")
        if args.train_manifest:
            cfg.data.sources[args.task] = SourceConfig(manifest=args.train_manifest, val_manifest=args.val_manifest, root=args.root)
        if args.task_root:
            cfg.eval.task_root = args.task_root
        cfg = finish_config(args, cfg)
        if args.learned_alpha and args.protocol != "lp":
            raise ConfigError("--learned-alpha: the averaging coefficients are learned with the linear probe (--protocol lp)")
        # flags that would otherwise be ignored without a word
        if args.alpha is not None and args.learned_alpha:
            raise ConfigError("--alpha and --learned-alpha: give the coefficients or learn them, not both")
        if args.per_layer and not args.learned_alpha:
            raise ConfigError("--per-layer: learns one coefficient set per parameter tensor; it needs --learned-alpha")
        if args.cache_features and (args.protocol != "lp" or args.learned_alpha):
            raise ConfigError("--cache-features: the probe on cached features is the plain linear probe, not "
                              + ("fine-tuning" if args.protocol != "lp" else "a learned alpha, which trains on Ray Train"))
        (videos,) = check_tasks(cfg, [args.task], "--task").values()
        if args.protocol == "ft" or args.learned_alpha or not args.cache_features:  # trained on Ray Train in batches
            check_epoch(cfg, args.protocol, videos, f"task {args.task}")
        check_storage(cfg)  # the probe's or fine-tuning's run folder, and the results by default
        out = output_dir(args.output_dir, cfg, "-eval")

    from ppma_ray.train.checkpoint import count_models  # no Ray yet: the checks below come first

    with bad_input_exits(CheckpointError):  # unreadable files, and --alpha against the models they hold
        # Resolved once, here: a run folder's newest whole checkpoint is checked against its sums
        # (seconds for ViT-B with its optimizer state) and a torn newer one named, and the run gets
        # the weights file that was checked. A URI or Hub id stays one: the workers read it where they run.
        checkpoints = [weights_source("--checkpoint", c) for c in args.checkpoint]
        n_models = count_models(checkpoints)
        alphas = args.alpha
        for flag, given in (("--alpha", alphas is not None), ("--learned-alpha", args.learned_alpha)):
            if given and n_models < 2:
                raise ConfigError(f"{flag}: weight averaging needs two or more models; the checkpoints hold {n_models}")
        if alphas is not None and len(coefficients(alphas, n_models)) != n_models:
            raise ConfigError(f"--alpha: {len(alphas)} coefficients for {n_models} models")
        name = args.model_name or default_model_name(args.checkpoint, n_models, alphas, args.learned_alpha, args.per_layer)
        trains = not probe_on_cached_features(args.protocol, args.cache_features, args.learned_alpha, n_models)
        if trains:
            check_not_running(cfg, [evaluation_run_name(cfg.run.name, name, task_name(args.task), args.protocol)])

    cfg = start_ray(cfg, args.verbose)
    from ppma_ray.train.downstream import evaluate
    from ppma_ray.train.report import print_results, write_results
    from ppma_ray.train.stop import StoppedBySignal, graceful_stop

    # a probe or fine-tuning on Ray Train stops at its next log step with a checkpoint on SIGTERM /
    # SIGINT, as pretraining does; the cached-feature probe (no run to resume) stops at once
    try:
        with bad_input_exits(KeyError, ValueError), stage_failure_exits(), \
                (graceful_stop(f"ppma-stop-{cfg.run.name}-eval-{os.getpid()}") if trains else nullcontext()) as stop_flag:
            entry = evaluate(cfg, args.task, args.protocol, name, checkpoints, alphas, args.learned_alpha,
                             args.per_layer, args.cache_features, args.num_classes, stop_flag=stop_flag)
    except StoppedBySignal as stopped:
        print(f"{stopped}: re-run the same command to resume", file=sys.stderr)
        return stopped.exit_code
    print_results({"eval": [entry]})  # on the console first: a failed write below loses nothing
    if "learned_alpha" in entry:
        print(f"learned alpha: {entry['learned_alpha']}")
    try:
        write_results(out, [entry])
    except OSError as e:  # checked writable before Ray started; the disk can still fill up meanwhile
        print(f"error: the result above could not be added to {out / 'results.json'} ({e.strerror or e}); "
              "that file is as it was", file=sys.stderr)
        return 1
    print(f"results: {out / 'results.json'}")
    return 0
