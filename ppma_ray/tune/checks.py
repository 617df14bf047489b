"""What ``jobs/tune_mix.py`` checks before anything runs: the tune section against the rest of the
config (the section's own fields are checked as it loads, ``TuneSettings.check``), and a re-run
against the config its experiments started with (``check_restore``).

No Ray, Tune or torch import, on purpose, so the job rejects a bad value in well under a second
(importing the experiments themselves takes seconds).
"""

from __future__ import annotations

import json
import sys

import pyarrow.fs as pafs

from ppma_ray.config import (TRAINING_SECTIONS, ConfigError, PretrainConfig, absolute_paths, config_diff, differences,
                             read_record, to_dict)
from ppma_ray.data import objectstore
from ppma_ray.files import write_json

# what the trials of a restored experiment depend on (run.* and scaling.* may change between runs)
RECORDED = (*TRAINING_SECTIONS, "data.sources", "align", "tune", "eval")
NOT_RECORDED = ("tune.max_concurrent_trials", "tune.fail_p")  # how many run at once; a test hook
EXPERIMENTS = ("mix", "avg", "pbt")  # folders <run.name>-tune-<kind> (experiment_name)


def check(cfg: PretrainConfig) -> None:
    t = cfg.tune
    if not cfg.eval.tasks:
        raise ConfigError.at("eval.tasks", "the tuning objective needs at least one downstream task")
    for key in ("nohuman", "synthetic"):
        name = getattr(t, key)
        if name not in cfg.data.sources:
            raise ConfigError.at(f"tune.{key}", f"{name!r} is not a source in data.sources ({', '.join(sorted(cfg.data.sources))})")
    if cfg.align.mix_by != "weights":  # with "sizes" the proportion p would be ignored
        raise ConfigError.at("align.mix_by", f"{cfg.align.mix_by!r} ignores the proportion p that Tune searches; "
                                             "set align.mix_by=weights")
    if t.scheduler == "pbt":
        epochs = t.align_epochs or cfg.align.epochs
        if t.pbt_interval >= epochs:
            raise ConfigError.at("tune.pbt_interval", f"{t.pbt_interval} epochs leaves no second round in {epochs} "
                                                      "stage-2 epochs (tune.align_epochs)")


def experiment_name(cfg: PretrainConfig, kind: str) -> str:
    """The folder of one of the run's Tune experiments under ``run.storage_path``."""
    return f"{cfg.run.name}-tune-{kind}"


def _record(cfg: PretrainConfig) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path, path as shown) of ``<run.storage_path>/<run.name>-tune.json``: the config
    and stage-1 weights the run's Tune experiments started with, next to them."""
    shown = cfg.run.storage_path.rstrip("/") if objectstore.is_uri(cfg.run.storage_path) else cfg.run.storage_path
    fs, base = objectstore.folder_filesystem(shown)
    return fs, f"{base.rstrip('/')}/{cfg.run.name}-tune.json", f"{shown}/{cfg.run.name}-tune.json"


def check_restore(cfg: PretrainConfig, stage1: str | None) -> None:
    """Re-running the job restores the Tune experiments of ``run.name``, and Tune keeps their trials
    (their p values, grids, samples) whatever the config says now; the trials still to run would
    get the new config. So a config that differs where the trials depend on it is refused, naming
    the keys, as a re-run of ``jobs/pretrain.py`` is."""
    fs, path, shown = _record(cfg)
    base = path.rsplit("/", 1)[0]
    if all(fs.get_file_info(f"{base}/{experiment_name(cfg, k)}").type == pafs.FileType.NotFound for k in EXPERIMENTS):
        return  # nothing to restore (never run, or its folders deleted to start over)
    saved = read_record(fs, path, shown, ", so this re-run cannot be checked against the config its Tune experiments "
                        "started with: delete the file to restore them unchecked, or delete "
                        f"{shown.rsplit('/', 1)[0]}/{cfg.run.name}-tune-* to start over")
    if saved is None:  # experiments from before records were kept, or a deleted record
        print(f"warning: {shown} is missing, so the Tune experiments of run.name {cfg.run.name!r} that this run "
              "restores are not checked against the config they started with", file=sys.stderr)
        return
    now = json.loads(json.dumps(_entry(cfg, stage1)))  # as the file holds it
    diff = config_diff(saved["config"], now["config"], RECORDED, NOT_RECORDED)
    if saved.get("stage1") != now["stage1"]:
        diff.append(f"stage 1: {saved.get('stage1')!r} there, {now['stage1']!r} now")
    if diff:
        raise ConfigError(f"{shown}: the Tune experiments of run.name {cfg.run.name!r} ran with another config "
                          f"({differences(diff)}): re-running restores them, so "
                          f"use that config, another run.name, or delete {shown.rsplit('/', 1)[0]}/{cfg.run.name}-tune-* "
                          "to start over")


def write_record(cfg: PretrainConfig, stage1: str | None) -> None:
    """Write the record in one step (``files.write_json``): a kill mid-write leaves the old record or the new one."""
    fs, path, _ = _record(cfg)
    fs.create_dir(path.rsplit("/", 1)[0])
    write_json(fs, path, _entry(cfg, stage1))


def _entry(cfg: PretrainConfig, stage1: str | None) -> dict:
    """The record's content: paths absolute, as the job hands them to Ray (a re-run from another folder
    with the same relative paths reads other files)."""
    return {"config": to_dict(absolute_paths(cfg)), "stage1": stage1}
