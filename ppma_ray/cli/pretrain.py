"""PPMA pretraining: stage 1 MAE on no-human video, stage 2 alignment on no-human + synthetic.

    python jobs/pretrain.py [--config YAML] [--set key=value ...] [--output-dir DIR] [--stage mae|align]
                            [--resume-from CHECKPOINT]

With no arguments: the demo data (generated on first use), a tiny ViT, CPU. Works the same under
``ray job submit -- python jobs/pretrain.py ...`` (it joins the cluster). Re-running the same command
(same run.storage_path and run.name) resumes from the newest whole checkpoint of each stage;
``--resume-from`` continues a given checkpoint in a new run folder. To start a run over, give it
another run.name (or delete its folders, ``<run.storage_path>/<run.name>-<stage>``).
Writes DIR/results.json (DIR defaults to run.storage_path/run.name) and the resolved config.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ppma_ray.cli import (bad_input_exits, check_manifests_exist, check_not_running, check_resume_config, check_storage,
                          check_tasks, check_weights, finish_config, output_dir, parser, read_config,
                          stage_failure_exits, start_ray, weights_source)
from ppma_ray.config import TRAINING_SECTIONS, ConfigError, PretrainConfig, config_diff, differences, to_dict
from ppma_ray.data.objectstore import is_uri
from ppma_ray.files import write_text_atomic
from ppma_ray.models.errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--stage", choices=["mae", "align"], default=None, help="run one stage only")
    ap.add_argument("--init-from", default=None,
                    help="weights to start the (first) stage from: a checkpoint or run folder, a Hugging Face VideoMAE "
                         "folder or Hub id hf://ORG/NAME[@REVISION], a .safetensors/.pth/.pt/.bin file (ours, VideoMAE, "
                         "the released PPMA code)")
    ap.add_argument("--init-from-partial", action="store_true",
                    help="load --init-from even if trunk tensors are missing or left over (printed); default: an error")
    ap.add_argument("--random-init", action="store_true",
                    help="with --stage align: train stage 2 from random init, without stage 1 (not PPMA; printed)")
    ap.add_argument("--ablation", action="store_true",
                    help="also train stage 2 from random init, and probe the paper's four rows on eval.tasks: random "
                         "init, MAE only, alignment only, MAE + alignment (PPMA)")
    ap.add_argument("--resume-from", default=None, metavar="CHECKPOINT",
                    help="continue this checkpoint's training (weights, optimizer, step, data position) in this run's "
                         "folder; its stage is read from its weights, and stage 2 follows a stage-1 checkpoint")
    args = ap.parse_args(argv)
    stages = (args.stage,) if args.stage else ("mae", "align")
    with bad_input_exits(CheckpointError):
        if args.ablation and (args.stage or args.init_from):
            raise ConfigError("--ablation runs both stages from scratch: leave out --stage and --init-from")
        if args.init_from_partial and not args.init_from:  # else the run went on without it
            raise ConfigError("--init-from-partial: loads --init-from even when trunk tensors are missing or left over; "
                              "it needs --init-from")
        cfg = finish_config(args, read_config(args))
        if args.ablation and not cfg.eval.tasks:
            raise ConfigError("--ablation: eval.tasks is empty; the ablation probes every task")
        if args.resume_from:  # the checkpoint's stage, then stage 2 after a stage-1 checkpoint (unless --stage)
            if not is_uri(args.resume_from):  # a Ray Train worker runs in a folder of its own
                args.resume_from = os.path.abspath(args.resume_from)
            stage = resume_stage(cfg, args)
            stages = (stage,) if args.stage or stage == "align" else ("mae", "align")
        else:
            args.init_from = stage2_start(cfg, args)
        label_maps = check_manifests_exist(cfg, stages)
        if "align" in stages:  # probed once stage 2 has ended
            check_tasks(cfg, cfg.eval.tasks)
        check_resume_config(cfg, stages)
        check_storage(cfg)
        check_not_running(cfg, [f"{cfg.run.name}-{stage}" for stage in (*stages, *(["align_only"] if args.ablation else []))])
        out_dir = output_dir(args.output_dir, cfg)
        if args.init_from:
            args.init_from = weights_source("--init-from", args.init_from)
        check_weights(cfg, args.init_from, args.init_from_partial)

    from ppma_ray.train.report import print_results
    from ppma_ray.train.runner import pretrain
    from ppma_ray.train.stop import StoppedBySignal, graceful_stop

    cfg = start_ray(cfg, args.verbose)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    for name, labels in label_maps.items():  # named labels: the ids this run used, to pin them in later runs
        (out_dir / "label_maps").mkdir(exist_ok=True)
        write_text_atomic(out_dir / "label_maps" / f"{name}.json", json.dumps(labels, indent=2))
        print(f"data.sources.{name}: {len(labels)} named classes, ids in {out_dir / 'label_maps' / f'{name}.json'} "
              f"(data.sources.{name}.label_map keeps them in later runs)")
    try:
        with stage_failure_exits(), graceful_stop(f"ppma-stop-{cfg.run.name}-{os.getpid()}") as stop_flag:
            results = {"config": str(out_dir / "config.json"),
                       "stages": pretrain(cfg, stages, init_from=args.init_from, init_partial=args.init_from_partial,
                                          resume_from=args.resume_from, output_dir=out_dir, stop_flag=stop_flag)}
            write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
            if args.ablation:  # stage 2 without stage 1: the "alignment only" row
                from ppma_ray.train.config import RunOptions
                from ppma_ray.train.runner import run_stage

                results["stages"]["align_only"] = run_stage(
                    cfg, RunOptions("align", f"{cfg.run.name}-align_only", stop_flag=stop_flag), output_dir=out_dir)
                write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    except StoppedBySignal as stopped:
        print(f"{stopped}: re-run the same command to resume", file=sys.stderr)
        return stopped.exit_code
    except CheckpointError as e:  # a run folder with no whole checkpoint: found before its stage starts
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "align" in results["stages"] and cfg.eval.tasks:
        results["eval"] = probe_tasks(cfg, results["stages"], args.ablation)
        write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    print_results(results)
    print(f"results: {out_dir / 'results.json'}")
    return 0


def resume_stage(cfg: PretrainConfig, args) -> str:
    """``--resume-from CHECKPOINT``: the stage it continues (from its weights; ``--stage`` must
    agree), checked before Ray starts: the checkpoint is whole, it was trained with this config's
    model, clip and stage settings, and this run's folder for the stage holds no run yet (re-running
    continues that one). A stage-1 checkpoint that finished its epochs is stage 2's start
    (``args.init_from``); any other finished checkpoint has nothing left to continue."""
    if args.init_from or args.random_init or args.ablation:
        raise ConfigError("--resume-from continues a checkpoint's training: leave out --init-from, --random-init "
                          "and --ablation")
    from ppma_ray.train.checkpoint import (CONFIG_FILE, checkpoint_dirs, checkpoint_problem, checkpoint_stage, downloaded,
                                          storage, train_progress)

    path = args.resume_from
    remote = is_uri(path)
    if remote:
        # whole by name only, as Ray's own restore on object storage (checking would mean downloading
        # the optimizer state); its weights and config are read from a local copy, as evaluate's
        local = downloaded(path)
    else:
        local = Path(path)
        if not local.is_dir():
            raise ConfigError(f"--resume-from {path}: not a checkpoint folder")
        problem = checkpoint_problem(local)
        if problem:
            raise ConfigError(f"--resume-from {path}: cannot be resumed from: {problem}")
    stage = checkpoint_stage(local)
    if args.stage and args.stage != stage:
        raise ConfigError(f"--resume-from {path} is a {stage} checkpoint, not {args.stage}")
    diff = config_diff(json.loads((local / CONFIG_FILE).read_text()), json.loads(json.dumps(to_dict(cfg))),
                       (*TRAINING_SECTIONS, stage))
    if diff:
        raise ConfigError(f"--resume-from {path} was trained with another config ({differences(diff)}): continue it "
                          "with its own config")
    # a finished checkpoint in a bucket is found by its stage's run instead (``run_stage``: nothing
    # trains, and it is the stage's last checkpoint): its train state is most of the checkpoint
    done, epochs = (0 if remote else train_progress(local).get("epoch", 0)), getattr(cfg, stage).epochs
    if done >= epochs:  # its stage would end at once, without a checkpoint of this run to start stage 2 from
        if args.stage or stage == "align":
            raise ConfigError(f"--resume-from {path}: its {stage} training has finished ({done} of {epochs} epochs), "
                              "so there is nothing to continue; start the next stage from it with --init-from")
        print(f"{path} has finished stage 1 ({done} of {epochs} epochs): stage 2 starts from it", file=sys.stderr)
        args.init_from, args.resume_from = path, None
        return "align"
    fs, base, shown = storage(cfg.run.storage_path)
    if checkpoint_dirs(fs, f"{base.rstrip('/')}/{cfg.run.name}-{stage}"):
        raise ConfigError(f"{shown}/{cfg.run.name}-{stage} already holds a run: re-run without --resume-from to "
                          "continue it, or give this one another run.name")
    print(f"{stage} continues from {path}", file=sys.stderr)
    return stage


def stage2_start(cfg: PretrainConfig, args) -> str | None:
    """Stage 2 alone (``--stage align``) starts from stage 1: ``--init-from``, else the newest
    whole checkpoint of this run's stage 1 (``<storage>/<run.name>-mae``). Random init only when
    asked for (``--random-init``): a silently skipped stage 1 would be reported as PPMA."""
    if args.random_init and (args.stage != "align" or args.init_from):
        raise ConfigError("--random-init is for --stage align without --init-from")
    if args.stage != "align" or args.init_from:
        return args.init_from
    if args.random_init:
        print("note: stage 2 from random init (--random-init): no stage 1, so this is not PPMA", file=sys.stderr)
        return None
    from ppma_ray.train.checkpoint import stage1_checkpoint
    from ppma_ray.train.runlock import held

    busy = held(cfg.run.storage_path, [f"{cfg.run.name}-mae"])
    if busy:  # its newest checkpoint is a stage 1 half way
        raise ConfigError(f"--stage align: stage 1 is still training ({busy}): wait for it to finish, or pass --init-from")
    found, searched = stage1_checkpoint(cfg.run.storage_path, cfg.run.name)
    if found is None:
        raise ConfigError(f"--stage align needs a stage-1 checkpoint and {searched} has none: run --stage mae first, "
                          "pass --init-from, or train from random init with --random-init")
    print(f"stage 2 starts from stage 1's checkpoint {found}{stage1_progress(found)}", file=sys.stderr)
    return found


def stage1_progress(checkpoint: str) -> str:
    """`` (epoch E of N, step S)`` of a local stage-1 checkpoint, saying so when stage 1 stopped
    before its last epoch: stage 2 from a partly trained MAE is not the recipe, and must not look
    like it. Empty for a checkpoint in a bucket (its state file is not fetched to say this)."""
    if is_uri(checkpoint):
        return ""
    from ppma_ray.train.checkpoint import CONFIG_FILE, train_progress

    state = train_progress(checkpoint)
    epochs = json.loads((Path(checkpoint) / CONFIG_FILE).read_text()).get("mae", {}).get("epochs")
    done = int(state.get("epoch", 0))
    unfinished = epochs is not None and done < epochs
    return (f" (epoch {done} of {epochs}, step {state.get('step', 0)}"
            + ("; stage 1 did not finish, so stage 2 starts from a partly trained MAE)" if unfinished else ")"))


def probe_tasks(cfg: PretrainConfig, stages: dict, ablation: bool = False) -> list[dict]:
    """Linear probes (cached features) of the PPMA trunk and of a random-init trunk; with
    ``ablation`` also of the MAE-only and alignment-only trunks."""
    from ppma_ray.train.downstream import evaluate

    models = [("ppma", [stages["align"]["checkpoint"]])]
    if ablation:
        models += [("mae_only", [stages["mae"]["checkpoint"]]), ("align_only", [stages["align_only"]["checkpoint"]])]
    if cfg.eval.compare_random_init or ablation:
        models.append(("random_init", []))
    return [evaluate(cfg, task, "lp", name, ckpts, cache_features=True) for task in cfg.eval.tasks for name, ckpts in models]
