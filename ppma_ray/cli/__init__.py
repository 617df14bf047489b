"""What every job shares: the config flags, early checks and exit codes.

A config-driven job reads ``--config`` (default: the demo), applies ``--set key=value`` overrides,
its own flags and checks, and then either prints the resolved config (``--print-config``, exit 0) or
runs. Bad input (a config value, a manifest, a missing file) ends the job before Ray starts with
one line on stderr and exit code 2. The jobs' modules import torch and Ray only once they run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ppma_ray
from ppma_ray.config import (TRAINING_SECTIONS, ConfigError, PretrainConfig, SourceConfig, config_diff, differences,
                             dump_yaml, load_config)
from ppma_ray.data import objectstore
from ppma_ray.data.manifest import ManifestError, label_map_of, read_manifest
from ppma_ray.errors import one_line
from ppma_ray.schema import check_all

# The demo config ships beside the jobs (jobs/configs/); an installed entry point finds it from a
# checkout or an editable install. Elsewhere pass --config.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "demo.yaml"
BAD_INPUT = 2


class _OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line naming the flag, as any other bad input (argparse prints the whole
    usage block first, ten lines for ``evaluate``, with the line that matters last)."""

    def error(self, message: str):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (--help lists the flags)\n")


def parser(description: str | None, config: bool = True, uses_ray: bool = True) -> argparse.ArgumentParser:
    """An argument parser with ``--version``, ``--verbose`` for the jobs that start Ray and, for
    config-driven jobs, the config flags."""
    doc = (description or "").strip()
    epilog = "\n\n".join(doc.split("\n\n")[1:])
    if config:
        epilog = "\n\n".join(x for x in (epilog, config_keys_help()) if x)
    ap = _OneLineErrors(description=doc.split("\n\n")[0], epilog=epilog or None,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"ppma_ray {ppma_ray.__version__}")
    if uses_ray:
        ap.add_argument("--verbose", action="store_true",
                        help="also show Ray's own messages (start-up, Ray Data, Ray Train, worker tracebacks)")
    if config:
        ap.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name}, the demo)")
        ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key by its dotted name, e.g. align.mix.synthetic=0.7 (repeatable)")
        ap.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without starting Ray")
    return ap


def number(kind: type, ge: float | None = None, gt: float | None = None, le: float | None = None):
    """An argparse ``type`` for a number in a range: a value outside it is a usage error (exit 2)
    before anything runs. Without it ``remove_humans --threshold 2`` masked no pixel, wrote the
    videos with their people and reported success, and ``audit_privacy --threshold 2`` called any
    dataset clean."""
    bounds = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else "",
              f"<= {le}" if le is not None else ""]
    wanted = f"{'an integer' if kind is int else 'a number'} {' and '.join(b for b in bounds if b)}".rstrip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le) \
                or not math.isfinite(value):  # NaN passes every comparison
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def config_keys_help() -> str:
    """Every config key with its default and meaning, from the config classes themselves."""
    from ppma_ray.schema import describe

    rows = describe(PretrainConfig)
    width = max(len(f"{k} = {d}") for k, d, _ in rows if len(f"{k} = {d}") <= 48)
    lines = [f"  {f'{k} = {d}':<{width}}  {m}".rstrip() for k, d, m in rows]
    return ("config keys (--set KEY=VALUE; the defaults of the config classes, which --config's file may change;\n"
            "--print-config shows the values a run would use):\n" + "\n".join(lines))


def read_config(args: argparse.Namespace) -> PretrainConfig:
    """``--config`` + ``--set`` -> a checked config (``ConfigError`` names the key)."""
    path = args.config
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            raise ConfigError(f"--config: no default config at {DEFAULT_CONFIG}; pass a config file")
        path = DEFAULT_CONFIG
    return load_config(path, args.set)


def finish_config(args: argparse.Namespace, cfg: PretrainConfig) -> PretrainConfig:
    """After the job applied its own flags: check the config again, and print it if asked (exit 0)."""
    check_all(cfg)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        raise SystemExit(0)
    from ppma_ray.data.video import backend_problem  # numpy only: no torch, no Ray

    problem = backend_problem(cfg.data.decode.backend)
    if problem:  # this machine; decode nodes of a cluster are checked by their first task
        raise ConfigError.at("data.decode.backend", problem)
    for tracker, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if tracker in cfg.run.loggers and importlib.util.find_spec(module) is None:
            raise ConfigError.at("run.loggers", f"{tracker} is not installed here (pip install -e '.[tracking]')")
    return cfg


@contextmanager
def bad_input_exits(*more: type[BaseException]):
    """Bad input -> ``error: <one line>`` on stderr and exit code 2. Storage that cannot be read or
    written while the job checks its input (an unreachable bucket, a folder without permission) is
    bad input too: its error in one line, never a traceback."""
    try:
        yield
    except (ConfigError, ManifestError, FileNotFoundError, *more) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(BAD_INPUT) from None
    except OSError as e:
        print(f"error: {one_line(e, 500).removeprefix('OSError: ')}", file=sys.stderr)
        raise SystemExit(BAD_INPUT) from None


@contextmanager
def stage_failure_exits():
    """A stage whose Ray Train run failed -> ``error: <run> failed: rank R: ... (traceback: FILE)``
    on stderr and exit code 1: one line per failed rank, the traceback saved in the run folder."""
    from ppma_ray.train.runner import StageFailed  # the training stack, once Ray runs

    try:
        yield
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def check_manifests_exist(cfg: PretrainConfig, stages=("mae", "align")) -> dict[str, dict[str, int]]:
    """The manifests the stages read exist and parse (a ``ManifestError`` names file:line), and their
    relative video paths have a root to be relative to: without ``root`` they would resolve in each
    Ray worker's own working directory, and every decode would fail. URIs are checked where they are
    read. A stage whose epoch (its sources' videos, without ``samples_per_epoch``) makes no step is
    refused here, not when it starts (stage 2: after stage 1). Returns the label map of each source
    whose labels are class names."""
    names = {n for stage in stages for n in getattr(cfg, stage).source_names()}
    label_maps: dict[str, dict[str, int]] = {}
    videos: dict[str, int | None] = {}
    for name in sorted(names):
        labels, videos[name] = check_source(name, cfg.data.sources[name])
        if labels is not None:
            label_maps[name] = labels
    for stage in stages:
        trained = sorted(getattr(cfg, stage).trained_sources())
        sizes = [videos[n] for n in trained]
        check_epoch(cfg, stage, None if None in sizes else sum(sizes), ", ".join(trained))
    return label_maps


def check_epoch(cfg: PretrainConfig, stage: str, videos: int | None, sources: str) -> None:
    """Without ``samples_per_epoch`` an epoch is the sources' videos: fewer than one batch make no
    step, which Ray Train would find only when the stage starts (stage 2: after stage 1)."""
    section = getattr(cfg, stage)
    if section.samples_per_epoch is None and videos is not None and videos < section.batch_size:
        raise ConfigError.at(f"{stage}.batch_size", f"{section.batch_size} clips a step, but an epoch is the {videos} "
                                                    f"videos of {sources} ({stage}.samples_per_epoch unset): no step to train")


def check_source(name: str, src: SourceConfig) -> tuple[dict[str, int] | None, int | None]:
    """One source's local manifests (see ``check_manifests_exist``) -> its label map if its labels
    are class names, and its training videos (None for a list in object storage)."""
    if src.manifest.startswith("demo:"):
        from ppma_ray.data.demo import LAYOUT, NUM_CLASSES

        if (kind := src.manifest.split(":", 1)[1]) not in LAYOUT:
            raise ConfigError.at(f"data.sources.{name}.manifest", f"no demo set {kind!r} "
                                                                  f"(have {', '.join(f'demo:{k}' for k in LAYOUT)})")
        return None, LAYOUT[kind][0] * NUM_CLASSES
    labels, videos = None, None
    for key in ("manifest", "val_manifest"):
        path = getattr(src, key)
        if not path or objectstore.is_uri(path):
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.sources.{name}.{key}: {path} does not exist")
        table = read_manifest(path, root=src.root, label_map=src.label_map or labels)
        if key == "manifest":
            labels, videos = label_map_of(table), table.num_rows
        if src.root is None:
            relative = next((p for p in table.column("path").to_pylist()
                             if not os.path.isabs(p) and not objectstore.is_uri(p)), None)
            if relative is not None:
                raise ManifestError(path, None, f"video path {relative!r} is relative and data.sources.{name}.root is "
                                                f"not set: set it to the folder the paths are relative to")
    return labels, videos


def check_tasks(cfg: PretrainConfig, tasks: list[str], key: str = "eval.tasks",
                test_lists: bool = True) -> dict[str, int | None]:
    """The downstream tasks a job probes, checked before it trains for hours and only then gets to
    them: each task is known (a demo set, a catalog name, a source), its lists exist and parse, and
    it has a test list (``test_lists``; Tune's objective splits the training list instead). A
    catalog task's ``eval.task_root`` is a folder here (or a bucket URI). Returns each task's
    training videos (None: a list in object storage)."""
    from ppma_ray.data.catalog import CATALOG, load_split, task_source

    videos = {}
    for i, task in enumerate(tasks):
        where = f"{key}[{i}]" if key == "eval.tasks" else key
        try:
            src = task_source(task, cfg.data.sources, cfg.eval.task_root)
            if src.manifest.startswith("demo:"):  # a demo set (as a task or a source) has its test list
                videos[task] = check_source(task, src)[1]
                continue
        except (ConfigError, KeyError, ValueError, FileNotFoundError) as e:
            raise ConfigError.at(where, e.problem if isinstance(e, ConfigError) else e.args[0]) from None
        if task in CATALOG:  # the shipped lists: what is left to check is the folder they are relative to
            root = cfg.eval.task_root
            if not objectstore.is_uri(root) and not Path(root).is_dir():
                raise ConfigError.at("eval.task_root", f"{root}: no such folder (the videos of task {task!r})")
            videos[task] = load_split(task, "train").num_rows
            continue
        if test_lists and src.val_manifest is None:
            raise ConfigError.at(where, f"task {task!r} has no test list: set data.sources.{task}.val_manifest")
        videos[task] = check_source(task, src)[1]
    return videos


def check_resume_config(cfg: PretrainConfig, stages=("mae", "align")) -> None:
    """Re-running into a run folder continues its run, so the folder's saved config (in its newest
    checkpoint) must agree with this one where it shapes the training: ``model``, ``data.clip`` and
    the stage's own section. Bookkeeping keys (``run.*``, ``scaling.*``, ``eval.*``) may change."""
    from ppma_ray.config import to_dict
    from ppma_ray.train.checkpoint import CONFIG_FILE, checkpoint_dirs, storage

    fs, base, shown = storage(cfg.run.storage_path)
    now = json.loads(json.dumps(to_dict(cfg)))  # as config.json holds it (tuples as lists)
    for stage in stages:
        folder = f"{shown}/{cfg.run.name}-{stage}"
        for ckpt in checkpoint_dirs(fs, f"{base.rstrip('/')}/{cfg.run.name}-{stage}"):
            try:
                with fs.open_input_stream(f"{ckpt}/{CONFIG_FILE}") as f:
                    saved = json.loads(f.read().decode())
            except (OSError, ValueError):
                continue  # a damaged checkpoint: resume passes over it and says so
            diff = config_diff(saved, now, (*TRAINING_SECTIONS, stage))
            if diff:
                raise ConfigError(f"{folder} holds a run of another config ({differences(diff)}): re-running "
                                  "continues that run, so use its config, "
                                  "or start a new run with another run.name (or delete the folder)")
            break


def check_not_running(cfg: PretrainConfig, run_names: list[str]) -> None:
    """No other process trains into these run folders now (``train/runlock.py``): a second job there
    would resume from the first's checkpoints and write over them."""
    from ppma_ray.train.runlock import held

    problem = held(cfg.run.storage_path, run_names)
    if problem:
        raise ConfigError(f"{problem}: wait for it to finish, or use another run.name")


def check_storage(cfg: PretrainConfig, checkpoints: int | None = None) -> None:
    """A local ``run.storage_path`` can hold the run: not under a file, writable, and with room for
    ``checkpoints`` (default ``run.keep`` + 1, the one being written) checkpoints of this model
    with AdamW's state (4 + 8 bytes per parameter). In object storage: an object can be written
    there (the bucket exists, the credentials may write); a bucket has no size to check."""
    if objectstore.is_uri(cfg.run.storage_path):
        check_bucket_writable("run.storage_path", cfg.run.storage_path)
        return
    import shutil

    path = check_writable("run.storage_path", cfg.run.storage_path)
    import torch

    from ppma_ray.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, "mae", 1, img_size=cfg.data.clip.img_size, num_frames=cfg.data.clip.num_frames)
    need = 12 * sum(p.numel() for p in model.parameters()) * (checkpoints or cfg.run.keep + 1)
    free = shutil.disk_usage(path).free
    if free < need:
        raise ConfigError.at("run.storage_path", f"{path} has {free / 2**30:.1f} GiB free; {checkpoints or cfg.run.keep + 1} "
                                                 f"checkpoints of this model with optimizer state need {need / 2**30:.1f} GiB")


def output_dir(given: str | None, cfg: PretrainConfig, suffix: str = "") -> Path:
    """Where a job writes its own files (``config.json``, ``results.json``, label maps, reject lists):
    ``--output-dir``, else beside its run folders, ``run.storage_path/<run.name><suffix>``, checked
    writable before Ray starts. They are local files: with ``run.storage_path`` in a bucket the default
    is ``./outputs/<run.name><suffix>`` on the machine the job runs on, said here (``Path`` made the
    URI a local folder named ``s3:`` under the working directory)."""
    if given:
        return check_writable("--output-dir", given)
    name = f"{cfg.run.name}{suffix}"
    if not objectstore.is_uri(cfg.run.storage_path):
        return Path(cfg.run.storage_path).resolve() / name  # check_storage checked the folder
    out = check_writable("--output-dir", Path("outputs") / name)
    print(f"note: run.storage_path is a bucket; the job's own files (results, config) go to {out} on this machine "
          f"(--output-dir sets where)", flush=True)
    return out


def check_bucket_writable(key: str, uri: str) -> None:
    """A folder in a bucket that a job writes to: a small object is written there and deleted, from
    this machine, before Ray starts. Ray Train's controller would otherwise be the first to find a
    bucket that is not there, or credentials that may not write, with a traceback of its own."""
    try:
        objectstore.write_probe(*objectstore.filesystem(uri))
    except OSError as e:
        raise ConfigError.at(key, f"{uri} cannot be written ({one_line(e, 300).removeprefix('OSError: ')})") from None


def check_writable(key: str, folder: str | os.PathLike) -> Path:
    """A local folder a job writes its outputs to, checked before the job spends its time on them: it
    is created (the job would create it anyway) and a file is written and removed there. Permission
    bits alone would pass a read-only file system, or anything for root. Returns the folder."""
    path = Path(folder).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError.at(key, f"{path} is a file" if existing == path else f"{path} is under {existing}, which is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ppma_write_check_"):
            pass
    except OSError as e:
        raise ConfigError.at(key, f"{path} cannot be written ({e.strerror or type(e).__name__})") from None
    return path


def weights_source(flag: str, source: str) -> str:
    """A weights flag's value (``--init-from``, ``--stage1``, ``--checkpoint``) as the Ray workers get
    it. A bucket URI or Hub id stays as given: each node reads it for itself. Anything on this machine
    (a weights file, a checkpoint or Hugging Face folder, a run folder) becomes its weights file as an
    absolute path, since a Ray Train worker runs in a folder of its own; a run folder gives its newest
    whole checkpoint, named (a torn newer one is named too)."""
    from ppma_ray.train.checkpoint import is_remote, resolve_checkpoint, run_checkpoint

    if is_remote(source):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {source}: does not exist")
    if (newest := run_checkpoint(path)) is not None:
        from ppma_ray.train.runlock import training_now

        busy = training_now(path)  # its newest checkpoint is not its last one
        print(f"{flag}: {newest} (the newest whole checkpoint of {source}"
              f"{f'; that run is still training: {busy}' if busy else ''})", file=sys.stderr)
        path = newest
    return str(resolve_checkpoint(path))


def check_weights(cfg: PretrainConfig, source: str | None, partial: bool = False) -> None:
    """Match a local weights source (any layout ``load_trunk`` reads) against the run's model, built
    on the meta device: a file that would load partially or not at all fails here, in a second,
    instead of inside a training worker. A Hugging Face Hub id (``hf://``) is fetched here first (the
    workers then read the Hub cache on this node); a bucket URI is checked where it is read."""
    if not source or objectstore.is_uri(source):
        return
    import torch

    from ppma_ray.models import build_model
    from ppma_ray.models.checkpoint import match_trunk

    with torch.device("meta"):
        model = build_model(cfg.model, "classifier", 1, img_size=cfg.data.clip.img_size,
                            num_frames=cfg.data.clip.num_frames)
    report = match_trunk(model, source, strict=not partial)[0]
    if report.missing or report.unexpected:
        print(f"warning: loading {source} partially (--init-from-partial): {report}", file=sys.stderr)


def start_ray(cfg: PretrainConfig, verbose: bool = False) -> PretrainConfig:
    """Join the cluster (or start a local Ray), resolve the paths, and run the cheap preflight;
    a failed preflight prints its table and exits 1. On a cluster the preflight first asks the
    autoscaler for missing GPUs/CPUs and waits up to ``scaling.resource_wait_s`` (a local Ray cannot
    grow: no wait)."""
    from ppma_ray.preflight import cheap_checks, format_table
    from ppma_ray.ray_env import init_ray
    from ppma_ray.train.runner import resolve_paths

    joined = init_ray(verbose=verbose)
    cfg = resolve_paths(cfg)
    checks = cheap_checks(cfg, cfg.scaling.resource_wait_s if joined else 0.0)
    if not all(c.ok for c in checks):
        print(format_table(checks), file=sys.stderr)
        print("error: preflight failed (python jobs/preflight.py runs every check)", file=sys.stderr)
        raise SystemExit(1)
    return cfg
