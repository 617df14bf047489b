"""Downstream evaluation: linear probe or fine-tuning of a pretrained trunk on a task.

    python jobs/evaluate.py --checkpoint runs/demo-align --task demo:motion --protocol lp [--cache-features]
    python jobs/evaluate.py --checkpoint A B --alpha 0.5 --task ucf101 --task-root /data/ucf101 --protocol ft
    python jobs/evaluate.py --checkpoint A B --learned-alpha --task demo:motion --protocol lp
    python jobs/evaluate.py --task mydata --train-manifest train.csv --val-manifest test.csv --root /videos

--checkpoint: a run directory (its newest checkpoint), a checkpoint directory or a weights file
(.safetensors, or a VideoMAE .pth); none = random init; several = weight averaging (fixed --alpha,
one per checkpoint or one for the first of two; or --learned-alpha with the linear probe).
Testing: 2 clips x 3 crops per video, softmax averaged; undecodable test videos are excluded and
reported, never replaced. Writes DIR/results.json (entries under "eval") and appends DIR/results.csv.
"""

from __future__ import annotations

from pathlib import Path

from ppma_ray.cli import bad_input_exits, finish_config, parser, read_config, start_ray
from ppma_ray.config import ConfigError, SourceConfig


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--checkpoint", nargs="*", default=[])
    ap.add_argument("--task", required=True, help="demo:<name>, a catalog name (ucf101, ...), or a new name with --train-manifest")
    ap.add_argument("--protocol", choices=["lp", "ft"], default="lp")
    ap.add_argument("--cache-features", action="store_true", help="LP on features extracted once (Ray Data)")
    ap.add_argument("--alpha", type=float, nargs="*", default=None, help="fixed averaging coefficients")
    ap.add_argument("--learned-alpha", action="store_true", help="learn the averaging coefficients with the LP head")
    ap.add_argument("--per-layer", action="store_true", help="one learned coefficient set per parameter tensor")
    ap.add_argument("--model-name", default=None, help="row name in the results (default: from the checkpoint)")
    ap.add_argument("--train-manifest")
    ap.add_argument("--val-manifest")
    ap.add_argument("--root")
    ap.add_argument("--task-root", help="video directory of a catalog task")
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)
    with bad_input_exits():
        cfg = read_config(args)
        if args.train_manifest:
            cfg.data.sources[args.task] = SourceConfig(manifest=args.train_manifest, val_manifest=args.val_manifest, root=args.root)
        if args.task_root:
            cfg.eval.task_root = args.task_root
        cfg = finish_config(args, cfg)
        alphas = args.alpha
        if alphas is not None and len(alphas) == 1 and len(args.checkpoint) == 2:
            alphas = [alphas[0], 1.0 - alphas[0]]
        if alphas is not None and len(alphas) != len(args.checkpoint):
            raise ConfigError(f"--alpha: {len(alphas)} coefficients for {len(args.checkpoint)} checkpoints")
        if args.learned_alpha and args.protocol != "lp":
            raise ConfigError("--learned-alpha: the averaging coefficients are learned with the linear probe (--protocol lp)")

    from ppma_ray.train.downstream import evaluate, write_results
    from ppma_ray.train.report import print_results

    cfg = start_ray(cfg)
    name = args.model_name or ("random_init" if not args.checkpoint else
                               "avg" if len(args.checkpoint) > 1 else Path(args.checkpoint[0]).name)
    with bad_input_exits(KeyError, ValueError):
        entry = evaluate(cfg, args.task, args.protocol, name, args.checkpoint, alphas, args.learned_alpha,
                         args.per_layer, args.cache_features, args.num_classes)
    out = Path(args.output_dir) if args.output_dir else Path(cfg.run.storage_path) / f"{cfg.run.name}-eval"
    write_results(out, [entry])
    print_results({"eval": [entry]})
    if "learned_alpha" in entry:
        print(f"learned alpha: {entry['learned_alpha']}")
    print(f"results: {out / 'results.json'}")
    return 0
