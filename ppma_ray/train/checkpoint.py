"""Run checkpoints: ``model.safetensors`` + ``train_state.pt`` + ``config.json``, sealed by
``manifest.json`` (every file's size and SHA-256, written last) so that a checkpoint cut short by a
crash, a full disk or an interrupted upload is recognised on resume (``checkpoint_problem``).

``train_state.pt`` holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: optimizer state, step, epoch, step within the epoch (the data
plan cursor), the seed, and the loss so far. Randomness needs no saved generator state: every
step reseeds from (seed, rank, step), so a resumed step draws exactly what it would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ppma_ray.data import objectstore
from ppma_ray.errors import one_line
from ppma_ray.models import hub
from ppma_ray.models.checkpoint import models_in, weights_file
from ppma_ray.models.errors import CheckpointError

MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "train_state.pt", "config.json"
# written beside them by the training loop: the videos rejected so far, and counts per source
REJECTS_FILE, FAILURES_FILE = "rejects.csv", "data_failures.json"
MANIFEST_FILE = "manifest.json"
# a local copy of a checkpoint in object storage (``downloaded``) names its URI in this file, and is
# deleted once no job has used it for this long
SOURCE_FILE, DOWNLOAD_KEEP_S = "source.txt", 7 * 86400


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, config: dict, extra: dict[str, str] | None = None) -> Path:
    """The three files, any ``extra`` text files (name -> content), then the manifest over them all."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(d / MODEL_FILE), metadata={"format": "pt"})
    full = dict(state)
    if optimizer is not None:
        full["optimizer"] = optimizer.state_dict()
    torch.save(full, d / STATE_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    for name, text in (extra or {}).items():
        (d / name).write_text(text)
    seal_checkpoint(d)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def seal_checkpoint(directory: str | Path) -> None:
    """Write ``manifest.json``: size and SHA-256 of every other file in the folder."""
    d = Path(directory)
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None: it can). With a manifest every file
    must be there with its size and checksum; a folder without one (written before checkpoints
    were sealed, or cut short before the manifest arrived) must at least load."""
    d = Path(directory)
    if (d / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text())
        except ValueError:
            return f"{MANIFEST_FILE} is not valid JSON"
        for name, entry in manifest.items():
            f = d / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != entry["size"]:
                return f"{name} has {f.stat().st_size} bytes, {entry['size']} were written"
            if _sha256(f) != entry["sha256"]:
                return f"{name} does not match its checksum"
        return None
    for name in (MODEL_FILE, STATE_FILE):
        if not (d / name).is_file():
            return f"{name} is missing"
    try:
        with safe_open(str(d / MODEL_FILE), framework="pt") as f:
            list(f.keys())
        torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader error means the same: this folder cannot be resumed from
        return one_line(e)
    return None


def checkpoint_stage(directory: str | Path) -> str:
    """``mae`` or ``align``: the pretraining stage whose weights a checkpoint holds (an MAE model has
    a decoder, a stage-2 model has classification heads)."""
    with safe_open(str(Path(directory) / MODEL_FILE), framework="pt") as f:
        tops = {k.split(".", 1)[0] for k in f.keys()}
    if "decoder" in tops or "mask_token" in tops:
        return "mae"
    if "heads" in tops:
        return "align"
    raise CheckpointError(f"{directory}: neither an MAE model nor a stage-2 classifier (its tensors: {sorted(tops)})")


def read_train_state(directory: str | Path) -> dict:
    """``train_state.pt`` on the host, whatever device its tensors were saved from: a GPU worker's
    optimizer state is CUDA tensors, and the driver (often a CPU-only head node) reads it too."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def train_progress(directory: str | Path) -> dict:
    """``train_state.pt`` without its optimizer state (step, epoch, metrics): the file is mapped, not
    read, so a ViT-B checkpoint's 1 GB of AdamW moments is never loaded to learn where it stands."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    state.pop("optimizer", None)
    return state


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model (and optimizer, whose state follows its parameters' device) in place; returns
    the train state (without the optimizer)."""
    d = Path(directory)
    model.load_state_dict(load_file(str(d / MODEL_FILE)))
    state = read_train_state(d)
    opt_state = state.pop("optimizer", None)
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return state


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's step (masks, drop-path, mixup, erasing)."""
    return (seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1)


def storage(storage_path: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path in it, path as shown) of ``run.storage_path``: a local folder (made
    absolute) or an object-storage URI, reached as the data is (``data/objectstore.py``: the
    endpoint of ``AWS_ENDPOINT_URL``, which pyarrow's own ``FileSystem.from_uri`` ignores)."""
    shown = storage_path.rstrip("/") if objectstore.is_uri(storage_path) else os.path.abspath(storage_path)
    fs, base = objectstore.folder_filesystem(shown)
    return fs, base, shown


def ray_storage(storage_path: str) -> dict:
    """Ray Train's / Tune's ``RunConfig`` storage arguments for ``run.storage_path``: on object
    storage the filesystem is ours (above), so checkpoints go where the data comes from."""
    if not objectstore.is_uri(storage_path):
        return {"storage_path": storage_path}
    fs, base, _ = storage(storage_path)
    return {"storage_path": base, "storage_filesystem": fs}


def location(checkpoint, storage_path: str) -> str:
    """A Ray checkpoint as the jobs print it and take it back (``--init-from``, ``--resume-from``,
    stage 2's start): its local path, or on object storage its URI (Ray's ``path`` has no scheme)."""
    if objectstore.is_uri(storage_path):
        return f"{storage_path.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def open_checkpoint(where: str):
    """A ``ray.train.Checkpoint`` of a local path or an object-storage URI (through our filesystem)."""
    import ray.train

    if objectstore.is_uri(where):
        fs, path = objectstore.filesystem(where)
        return ray.train.Checkpoint(path, filesystem=fs)
    return ray.train.Checkpoint(where)


def is_remote(source: str | Path | None) -> bool:
    """Whether a checkpoint is named by a bucket URI or a Hugging Face Hub id (``hf://``): handed to
    the workers as it is, since each node reads or fetches it for itself (a local copy's path would
    exist on this node only), and never made an absolute path."""
    return objectstore.is_uri(source) or hub.is_hub(source)


def count_models(checkpoints: list[str]) -> int:
    """Models in the checkpoints: one per file, K for the released ensemble file."""
    return sum(models_in(resolve_checkpoint(c)) for c in checkpoints)


def resolve_checkpoint(path: str | Path) -> Path:
    """A weights file, a checkpoint directory, or a Ray run directory (its newest checkpoint);
    absolute, since workers do not share the driver's working directory. A checkpoint in object
    storage (its URI, as ``results.json`` names it) is downloaded first (``downloaded``); a Hub id
    is fetched into the Hub's cache."""
    if hub.is_hub(path):
        return weights_file(path)
    if objectstore.is_uri(path):
        path = downloaded(path)
    p = Path(path).resolve()
    if p.is_file():
        return p
    if (newest := run_checkpoint(p)) is not None:
        return newest / MODEL_FILE
    try:  # a checkpoint folder or a Hugging Face folder (model.safetensors, pytorch_model.bin or their shards)
        return weights_file(p)
    except CheckpointError:
        raise FileNotFoundError(f"{path}: no weights file, checkpoint, run or Hugging Face folder there") from None


def downloaded(uri: str) -> Path:
    """A local copy of the weights and config of the checkpoint folder at ``uri`` (not its
    optimizer state, most of a checkpoint's size), made once per machine and version of the
    objects (their size and modification time name the copy: an object written again is fetched
    again): the probes and averages read weights from local files. Each file lands whole or not at
    all (written aside, then renamed)."""
    fs, folder = objectstore.filesystem(uri.rstrip("/"))
    infos = {name: fs.get_file_info(f"{folder}/{name}") for name in (MODEL_FILE, CONFIG_FILE)}
    if infos[MODEL_FILE].type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no {MODEL_FILE} there")
    version = json.dumps([uri, *[(i.size, i.mtime_ns) for i in infos.values()]])
    cache = Path(tempfile.gettempdir()) / "ppma_ray_downloads"
    local = cache / hashlib.sha1(version.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    for name, info in infos.items():
        if info.type != pafs.FileType.File or (local / name).is_file():
            continue
        with fs.open_input_stream(f"{folder}/{name}") as f:
            (local / f"{name}.part").write_bytes(f.read())
        os.replace(local / f"{name}.part", local / name)
    if not (local / SOURCE_FILE).is_file():
        (local / SOURCE_FILE).write_text(uri + "\n")
    os.utime(local)  # used now: the copy's folder time is its last use
    prune_downloads(cache, keep=local)
    return local


def prune_downloads(cache: Path, keep: Path, unused_s: float = DOWNLOAD_KEEP_S) -> None:
    """Delete the local copies in ``cache`` that no job has used for ``unused_s`` (a week), each
    named on stderr: a ViT-B copy is about 350 MB, and a tuning campaign over checkpoints in a bucket
    makes one per checkpoint it probes. A copy in use is safe: every use marks it (``downloaded``),
    and its reader has loaded the weights long before a week is over."""
    now = time.time()
    for copy in cache.iterdir():
        try:
            unused = now - copy.stat().st_mtime
        except FileNotFoundError:  # another process pruned it first
            continue
        if copy == keep or not copy.is_dir() or unused < unused_s:
            continue
        try:
            named = (copy / SOURCE_FILE).read_text().strip()
        except OSError:  # a copy made before copies named their source
            named = copy.name
        shutil.rmtree(copy, ignore_errors=True)
        print(f"removed the local copy of {named} ({copy}): unused for {unused / 86400:.0f} days", file=sys.stderr,
              flush=True)


def upload_folder(local: Path, uri: str) -> str:
    """Copy a local folder's files to ``uri`` (object storage); returns ``uri``."""
    objectstore.upload_folder(local, *objectstore.filesystem(uri))
    return uri


def checkpoint_dirs(fs: pafs.FileSystem, folder: str) -> list[str]:
    """A run folder's ``checkpoint_<time>`` folders, newest first (none if the folder is absent)."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
                  reverse=True)


def newest_whole(fs: pafs.FileSystem, folder: str) -> tuple[str | None, dict[str, str]]:
    """(The newest checkpoint in ``folder`` that is whole, or None; why each newer one is not).
    On object storage by name only: checking would mean downloading it."""
    problems: dict[str, str] = {}
    for path in checkpoint_dirs(fs, folder):
        problem = None if not isinstance(fs, pafs.LocalFileSystem) else checkpoint_problem(path)
        if problem is None:
            return path, problems
        problems[path] = problem
    return None, problems


def run_checkpoint(run: str | Path) -> Path | None:
    """The newest whole checkpoint of the local run folder ``run`` (None: ``run`` is not a run
    folder: a file, a checkpoint itself, or a folder with no ``checkpoint_*`` folder). Each newer one
    passed over is named on stderr; when none is whole, a ``CheckpointError`` says why each is not
    (a save cut short by a crash or a full disk)."""
    if not Path(run).is_dir() or (Path(run) / MODEL_FILE).is_file():
        return None
    newest, problems = newest_whole(pafs.LocalFileSystem(), str(Path(run).resolve()))
    if newest is None and problems:
        raise CheckpointError(f"{run}: no checkpoint in it is whole: "
                              + "; ".join(f"{Path(c).name}: {why}" for c, why in problems.items()))
    for c, why in problems.items():
        print(f"WARNING: {c} is not whole ({why}); using {Path(newest).name}", file=sys.stderr, flush=True)
    return Path(newest) if newest else None


def stage1_checkpoint(storage_path: str, run_name: str) -> tuple[str | None, str]:
    """(The newest whole checkpoint of this run's stage 1, or None; the folder searched, as
    shown); the jobs call it before Ray starts."""
    fs, base, shown = storage(storage_path)
    found = newest_whole(fs, f"{base.rstrip('/')}/{run_name}-mae")[0]
    shown = f"{shown}/{run_name}-mae"
    return (found and f"{shown}/{found.rsplit('/', 1)[1]}"), shown
