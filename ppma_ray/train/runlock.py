"""One process at a time per run folder.

Two jobs training into one ``<run.storage_path>/<run name>`` (the same command submitted twice,
``tune_mix`` starting stage 1 while ``pretrain`` trains it) would each resume from the same
checkpoints, write checkpoints over each other's, interleave their metrics logs, and the resume
logic of the second (``runner.own_resume``) would delete the first's checkpoint in progress as an
unlisted leftover. So a run folder is held by the process that trains into it: the lock file
``<run.storage_path>/.<run name>.lock`` (``files.exclusive``).

Local storage only (a shared file system included: Linux passes ``flock`` on NFS to the server).
Object stores have no locks; there, as with Ray Train's own folders, one job per run name is the
user's to keep.
"""

from __future__ import annotations

import contextlib
import os

from ppma_ray.data import objectstore
from ppma_ray.files import InUse, exclusive

__all__ = ["InUse", "held", "run_lock", "training_now"]


def run_lock(storage_path: str, run_name: str):
    """A context that holds run ``run_name``'s folder under ``storage_path`` (``InUse`` if another
    process does); a no-op for object storage."""
    if objectstore.is_uri(storage_path):
        return contextlib.nullcontext()
    folder = os.path.abspath(storage_path)
    return exclusive(os.path.join(folder, f".{run_name}.lock"), os.path.join(folder, run_name))


def held(storage_path: str, run_names: list[str]) -> str | None:
    """What the first of ``run_names`` that another process trains into says (``InUse``'s message),
    else None: the jobs' check before Ray starts (the run itself takes the lock for good)."""
    for name in run_names:
        try:
            with run_lock(storage_path, name):
                pass
        except InUse as e:
            return str(e)
        except OSError:  # storage that cannot be written: the storage check names it
            return None
    return None


def training_now(run_folder: str | os.PathLike) -> str | None:
    """Whether another process trains into a local run folder now (``InUse``'s message), for a job
    that reads the folder's newest checkpoint. A folder no locking run ever used has no lock file,
    and none is created in it for asking."""
    folder = os.path.abspath(run_folder)
    parent, name = os.path.split(folder)
    if not os.path.isfile(os.path.join(parent, f".{name}.lock")):
        return None
    return held(parent, [name])
