"""Writing the small files a run leaves for people and later jobs (``results.json``, summaries) so
that an interrupted write never destroys what was there.

``Path.write_text`` truncates the file first: a full disk, a file-size limit or a kill in the middle
leaves a torn file, and for an accumulating file (``evaluate``'s ``results.json``) every earlier
entry with it. Here the text goes to a temporary file in the same folder, which then replaces the
old file in one step (``os.replace`` is atomic on one file system): readers see the old file or the
new one, never a mix.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step; on any error the old file is left as it was."""
    path = Path(path)
    # not mkstemp: its files are private (0600); this one is created as any file is (umask applies)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:  # the text as given, on every platform
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name: a crash then leaves old or new
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_csv_atomic(path: str | Path, fieldnames: list[str], rows: list[dict]) -> None:
    """A CSV of ``rows`` (keys beyond ``fieldnames`` left out), replacing ``path`` in one step."""
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=fieldnames, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, text.getvalue())


def write_json(fs: pafs.FileSystem, path: str, obj) -> None:
    """``obj`` as indented JSON at ``path`` of a pyarrow filesystem (a run's storage: local or a
    bucket), in one step: locally through ``write_text_atomic``; in a bucket an object appears only
    when its upload completes."""
    text = json.dumps(obj, indent=2)
    if isinstance(fs, pafs.LocalFileSystem):
        write_text_atomic(path, text)
        return
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_json(fs: pafs.FileSystem, path: str):
    """The JSON at ``path`` of a pyarrow filesystem: ``FileNotFoundError`` when it is not there,
    ``ValueError`` when it is not UTF-8 JSON (cut short, or another file)."""
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


@contextlib.contextmanager
def locked(path: str | Path):
    """Hold an exclusive lock on ``path`` (a lock file, created if missing) for a read-modify-write
    that several processes may do at once: two ``evaluate`` runs finishing into one output folder
    would otherwise each read the old ``results.json`` and the second write drop the first's entry.
    An advisory POSIX lock (``fcntl.flock``), released by the kernel if the holder dies. Where
    ``fcntl`` does not exist (Windows) the lock is a no-op; the write itself stays atomic."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class InUse(RuntimeError):
    """Another process holds the lock (``exclusive``)."""


_held: dict[str, int] = {}  # locks this process holds (path -> depth): taking one again nests
_held_lock = threading.Lock()


@contextlib.contextmanager
def exclusive(path: str | Path, what: str):
    """Hold ``path``'s lock while the block runs, or raise ``InUse`` at once (never wait): for work
    that one process at a time may do, such as training into a run folder. The lock file says who
    holds it (pid, host, since when), for the error of the process that finds it held. The kernel
    releases the lock when its holder exits or is killed, so a crash never leaves it held; the file
    stays (deleting it would race with the next holder). A process may take a lock it holds again
    (an evaluation holds its run folder around the stage, which takes it too). Where ``fcntl`` does
    not exist (Windows) nothing is held."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path).absolute()
    key = str(path)
    with _held_lock:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not said which yet"
            raise InUse(f"{what} is in use by another run ({holder}; lock {path})") from None
        with _held_lock:
            _held[key] = 1
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            yield
        finally:
            with _held_lock:
                del _held[key]
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
