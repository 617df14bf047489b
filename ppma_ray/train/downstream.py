"""Downstream evaluation of a representation: linear probe (LP) or fine-tuning (FT) on a task,
from any checkpoint, from random init, or from a weight average of several checkpoints."""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from ppma_ray.config import (ClipConfig, ConfigError, ModelConfig, PretrainConfig, config_diff, differences, from_dict,
                             read_record, to_dict)
from ppma_ray.data import objectstore
from ppma_ray.data.catalog import task_name, task_source
from ppma_ray.files import write_json
from ppma_ray.models import vit_config
from ppma_ray.models.averaging import average_state_dicts
from ppma_ray.models.checkpoint import load_trunks, read_state_dict
from ppma_ray.train.checkpoint import (CONFIG_FILE, checkpoint_dirs, count_models, is_remote, resolve_checkpoint, storage,
                                      upload_folder)
from ppma_ray.train.data import resolve_sources
from ppma_ray.train.linear_probe import linear_probe_cached
from ppma_ray.train.config import (AverageSpec, RunOptions, coefficients, evaluation_run_name,
                                   probe_on_cached_features)
from ppma_ray.train.runner import decode_cpu_budget, holding, resolve_paths, run_stage


def config_for_checkpoint(cfg: PretrainConfig, weights: Path | None) -> PretrainConfig:
    """Take the architecture and clip geometry from the checkpoint's own config.json, if any (for
    a Hugging Face folder: the architecture from transformers' config.json)."""
    if weights is None or not (weights.parent / CONFIG_FILE).is_file():
        return cfg
    saved = json.loads((weights.parent / CONFIG_FILE).read_text())
    cfg = copy.deepcopy(cfg)
    if saved.get("model_type") == "videomae":
        from ppma_ray.models.export import hf_vit_config

        arch = hf_vit_config(saved).to_dict()
        cfg.model = from_dict(ModelConfig, {k: arch[k] for k in ModelConfig.__dataclass_fields__ if k in arch}, "model")
        return cfg
    cfg.model = from_dict(ModelConfig, saved.get("model", {}), "model")
    cfg.data.clip = from_dict(ClipConfig, saved.get("data", {}).get("clip", {}), "data.clip")
    return cfg


def evaluate(cfg: PretrainConfig, task: str, protocol: str, model_name: str, checkpoints: list[str] | None = None,
             alphas: list[float] | None = None, learned_alpha: bool = False, per_layer: bool = False,
             cache_features: bool = False, num_classes: int | None = None, stop_flag: str | None = None) -> dict:
    """One (model, task, protocol) evaluation -> a results entry.

    ``checkpoints``: none (random init), one, or K >= 2 to average with fixed ``alphas`` or a
    learned alpha (LP only). ``num_classes`` (default: the largest label + 1) is checked against
    the labels. ``stop_flag``: the job's graceful-stop flag (``train/stop.py``) for a run on Ray
    Train, which then raises ``StoppedBySignal`` after its checkpoint."""
    # a weight average for runs in object storage is written here, uploaded, and removed at the end
    with tempfile.TemporaryDirectory(prefix="ppma_averaged_") as scratch:
        return _evaluate(cfg, task, protocol, model_name, checkpoints, alphas, learned_alpha, per_layer,
                         cache_features, num_classes, Path(scratch), stop_flag)


def _evaluate(cfg: PretrainConfig, task: str, protocol: str, model_name: str, checkpoints: list[str] | None,
              alphas: list[float] | None, learned_alpha: bool, per_layer: bool, cache_features: bool,
              num_classes: int | None, scratch: Path, stop_flag: str | None) -> dict:
    # local weights files (a checkpoint in object storage: a local copy; a Hub id: the Hub's cache)
    # for reading here; the Ray Train workers get those as they are, since they may run on other machines
    weights = [resolve_checkpoint(c) for c in checkpoints or []]
    given = [c if is_remote(c) else str(w) for c, w in zip(checkpoints or [], weights)]
    cfg = config_for_checkpoint(cfg, weights[0] if weights else None)
    n_models = count_models([str(w) for w in weights])  # resolved above: a URI is not looked up twice
    if alphas is not None:
        alphas = coefficients(alphas, n_models)
    if alphas is not None and len(alphas) != n_models:
        raise ConfigError(f"--alpha: {len(alphas)} coefficients for {n_models} models")
    name = task_name(task)
    cfg.data.sources = {**cfg.data.sources, name: task_source(task, cfg.data.sources, cfg.eval.task_root)}
    cfg = resolve_paths(cfg)
    # the labels first: a wrong --num-classes is refused before a weight average is computed
    (src,) = resolve_sources(cfg.data, [name])
    if src.val is None:
        raise ValueError(f"task {task!r} has no test list (val_manifest)")
    largest = int(max(src.train.table.column("label").to_numpy().max(), src.val.table.column("label").to_numpy().max()))
    if num_classes is not None and largest >= num_classes:
        raise ValueError(f"--num-classes {num_classes}, but task {task!r} has label {largest}")
    n_classes = num_classes or largest + 1
    stage = getattr(cfg, protocol)  # the lp: or ft: section, trained on the task alone with one head
    stage.mix, stage.mix_schedule, stage.heads = {name: 1.0}, [], "shared"
    if learned_alpha and n_models > 1 and protocol != "lp":
        raise ValueError("a learned averaging coefficient is trained with the linear probe (--protocol lp)")
    if n_models > 1 and not learned_alpha:
        alphas = coefficients(alphas, n_models)
    cached = probe_on_cached_features(protocol, cache_features, learned_alpha, n_models)
    run_name = evaluation_run_name(cfg.run.name, model_name, name, protocol)
    t0 = time.perf_counter()
    with holding(cfg, run_name):  # one job at a time, from the averaged weights written there to the run's end
        if not cached:
            claim_run_folder(cfg, run_name, protocol, name, {
                "weights": weights_identity(given, weights), "alphas": alphas, "learned_alpha": learned_alpha,
                "per_layer": per_layer, "num_classes": n_classes, "seed": cfg.run.seed,
                "test_views": [cfg.eval.test_clips, cfg.eval.test_crops]})
        top1, top5, videos, failed, extra = _run(cfg, protocol, run_name, src, n_classes, given, weights, n_models,
                                                 alphas, learned_alpha, per_layer, cached, scratch, stop_flag)
    return {"model": model_name, "task": name, "protocol": protocol, "top1": top1, "top5": top5, "videos": videos,
            "failed": failed, "num_classes": n_classes, "wall_s": time.perf_counter() - t0,
            "checkpoint": ",".join(given) or "random_init", **extra}


def _run(cfg: PretrainConfig, protocol: str, run_name: str, src, n_classes: int, given: list[str], weights: list[Path],
         n_models: int, alphas: list[float] | None, learned_alpha: bool, per_layer: bool, cached: bool,
         scratch: Path, stop_flag: str | None) -> tuple:
    """The evaluation itself: (top-1, top-5, test videos, failed test videos, extra entry fields)."""
    init_from, local_init, average = None, None, None  # for the workers, and for reading here
    if n_models == 1:
        init_from, local_init = given[0], str(weights[0])
    elif n_models > 1 and learned_alpha:
        average = AverageSpec(given, per_layer)
    elif n_models > 1:  # several checkpoints, or the released ensemble file
        init_state = average_state_dicts(load_trunks([str(w) for w in weights]), alphas)
        remote = objectstore.is_uri(cfg.run.storage_path)
        local_dir = scratch if remote else Path(cfg.run.storage_path) / run_name
        local_dir.mkdir(parents=True, exist_ok=True)
        local_init = init_from = str(local_dir / "averaged.safetensors")
        save_file({k: v.contiguous() for k, v in init_state.items()}, local_init)
        if remote:  # next to the run in the bucket, where every worker reads it
            init_from = upload_folder(local_dir, f"{cfg.run.storage_path.rstrip('/')}/{run_name}/averaged")

    if cached:
        model_cfg = vit_config(cfg.model, img_size=cfg.data.clip.img_size, num_frames=cfg.data.clip.num_frames)
        state = read_state_dict(local_init) if local_init else None
        decode = cfg.data.decode.with_budget(decode_cpu_budget(cfg))
        res = linear_probe_cached(model_cfg, state, src.train, src.val, n_classes, cfg.data.clip, decode, cfg.eval.test_clips,
                                  cfg.eval.test_crops, cfg.eval.lp_epochs, cfg.eval.lp_lr, cfg.eval.lp_weight_decay, cfg.run.seed)
        # full-batch head on un-augmented features: not the release's LP
        return res["top1"], res["top5"], res["videos"], res["failed"], {"lp_protocol": "cached-features"}
    out = run_stage(cfg, RunOptions(protocol, run_name, init_from=init_from, average=average, stop_flag=stop_flag))
    extra = {"learned_alpha": out["learned_alpha"]} if "learned_alpha" in out else {}
    if protocol == "lp":
        extra["lp_protocol"] = "augmented-clips"  # the head trained on the lp: stage's augmented clips (release)
    return out["test_top1"], out["test_top5"], out["test_videos"], out["test_failed"], extra


RECORD_FILE = "evaluation.json"


def weights_identity(given: list[str], weights: list[Path]) -> list[dict]:
    """What an evaluation starts from, to tell a re-run of it from another one: each checkpoint as
    given (a URI or Hub id: its name, which says its revision) or its local weights file with size
    and modification time (a run folder given again after more training resolves to a newer file)."""
    out = []
    for g, w in zip(given, weights):
        if is_remote(g):
            out.append({"weights": g})
        else:
            st = os.stat(w)
            out.append({"weights": str(w), "bytes": st.st_size, "modified_ns": st.st_mtime_ns})
    return out


def claim_run_folder(cfg: PretrainConfig, run_name: str, protocol: str, task: str, init: dict) -> None:
    """A downstream run folder continues its run when the evaluation is run again (an interrupted
    fine-tuning resumes; a finished one reports its result at once). So a folder holding a run of
    another evaluation (other weights, alphas, task, ``lp:``/``ft:`` settings or test views: an alpha
    sweep under one ``--model-name``, a run folder re-evaluated after more training) is refused,
    naming what differs, instead of handing back the other evaluation's result. The record
    (``evaluation.json``) is written before the run starts."""
    fs, base, shown = storage(cfg.run.storage_path)
    folder = f"{base.rstrip('/')}/{run_name}"
    record = json.loads(json.dumps({"config": to_dict(cfg), "init": init}))  # as the file holds it
    if checkpoint_dirs(fs, folder):
        saved = read_record(fs, f"{folder}/{RECORD_FILE}", f"{shown}/{run_name}/{RECORD_FILE}",
                            f"; delete {shown}/{run_name} to evaluate again")
        if saved is None:
            print(f"warning: {shown}/{run_name} has no {RECORD_FILE} (an earlier version's run): continuing it "
                  "without checking that it evaluates the same weights and settings", file=sys.stderr, flush=True)
        else:
            sections = ("init", "config.model", "config.data.clip", f"config.{protocol}", f"config.data.sources.{task}")
            diff = [d if len(d) <= 300 else d[:297] + "..." for d in config_diff(saved, record, sections)]
            if diff:
                raise ConfigError(f"{shown}/{run_name} holds the run of another evaluation ({differences(diff, 3)}): "
                                  "re-running continues that run, so give this one its own --model-name, or delete the "
                                  "folder to evaluate again")
    fs.create_dir(folder)
    write_json(fs, f"{folder}/{RECORD_FILE}", record)
