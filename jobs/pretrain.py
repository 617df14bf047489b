"""PPMA pretraining: stage 1 MAE on no-human video, stage 2 alignment on no-human + synthetic.

    python jobs/pretrain.py [--config YAML] [--set key=value ...] [--output-dir DIR] [--stage mae|align]

With no arguments: the demo data (generated on first use), a tiny ViT, CPU. Works the same under
``ray job submit -- python jobs/pretrain.py ...`` (it joins the cluster). Re-running the same command
(same run.storage_path and run.name) resumes from the last checkpoint of each stage.
Writes ``DIR/results.json`` (DIR defaults to run.storage_path/run.name) and the resolved config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also works from a plain checkout

from ppma_ray.config import ConfigError, load_config, to_dict  # noqa: E402
from ppma_ray.data.manifest import ManifestError  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--stage", choices=["mae", "align"], default=None, help="run one stage only")
    ap.add_argument("--init-from", default=None, help="checkpoint directory to start the (first) stage from")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from ppma_ray.train.runner import check_config

        check_config(cfg)
    except (ConfigError, ManifestError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ppma_ray.ray_env import init_ray
    from ppma_ray.train.report import print_results
    from ppma_ray.train.runner import pretrain, resolve_paths, run_dir

    def probe_tasks(cfg, checkpoint: str) -> list[dict]:
        """Linear probes (cached features) of the PPMA trunk and of a random-init trunk."""
        from ppma_ray.train.downstream import evaluate

        models = [("ppma", [checkpoint])] + ([("random_init", [])] if cfg.eval.compare_random_init else [])
        return [evaluate(cfg, task, "lp", name, ckpts, cache_features=True) for task in cfg.eval.tasks for name, ckpts in models]

    init_ray()
    cfg = resolve_paths(cfg)
    from ppma_ray.preflight import cheap_checks, format_table

    checks = cheap_checks(cfg)
    if not all(c.ok for c in checks):
        print(format_table(checks), file=sys.stderr)
        print("error: preflight failed (python jobs/preflight.py runs every check)", file=sys.stderr)
        return 1
    out_dir = Path(args.output_dir) if args.output_dir else run_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    stages = (args.stage,) if args.stage else ("mae", "align")
    results = {"config": str(out_dir / "config.json"), "stages": pretrain(cfg, stages, init_from=args.init_from)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    if "align" in results["stages"] and cfg.eval.tasks:
        results["eval"] = probe_tasks(cfg, results["stages"]["align"]["checkpoint"])
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print_results(results)
    print(f"results: {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
