"""Videos in object storage: ``s3://`` and ``gs://`` paths, read through pyarrow's filesystems.

A source's ``root`` (or a manifest's paths) may be a bucket URI. The decode task reads the whole
object into memory and decodes from there (decord, PyAV and torchcodec all take in-memory input),
so nothing is staged on local disk and no node needs a shared filesystem.

Configuration is the usual environment, so a local S3 server (MinIO, moto) works as well as AWS:
credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or the SDK's other sources), the
endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, the region from ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` (else the bucket's own, asked once). pyarrow's ``S3FileSystem`` reads the
credentials itself but not the endpoint variables (apache/arrow#49643), which is why the filesystem
is built here rather than with ``FileSystem.from_uri``. Google Cloud Storage goes through
``GcsFileSystem`` with its default credentials.

Transient errors (throttling, 5xx, dropped connections) are retried twice over: by the SDK's own
retry strategy for each request, and here around each whole read, with backoff. A missing object
is not transient: it raises ``FileNotFoundError`` at once.
"""

from __future__ import annotations

import functools
import os
import posixpath
import time
import uuid
from datetime import timedelta

import pyarrow.fs as pafs

from ppma_ray.errors import one_line

SCHEMES = ("s3", "gs", "gcs")
SDK_ATTEMPTS = 5  # per request, by the S3 SDK's standard retry strategy (exponential backoff)
READ_ATTEMPTS = 4  # per whole read, here
BACKOFF_S = 0.5


def is_uri(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names an object in a bucket (``s3://``, ``gs://``, ``gcs://``)."""
    return isinstance(path, str) and path.split("://", 1)[0] in SCHEMES and "://" in path


def location_problem(path: str | None) -> str | None:
    """What is wrong with a configured location (a local path, ``s3://`` or ``gs://``), or None.
    Another scheme (``hdfs://``, ``abfs://``, ``file://``) would otherwise be taken for a local
    folder named ``hdfs:``; query parameters (``?endpoint_override=...``, a form pyarrow's
    ``from_uri`` reads) would end up inside object names, since paths are joined onto the URI."""
    if not path or "://" not in path:
        return None
    scheme, rest = path.split("://", 1)
    if scheme not in SCHEMES:
        return f"{path}: a local path, or a bucket URI ({', '.join(s + '://' for s in SCHEMES)})"
    if "?" in rest or "#" in rest:
        return (f"{path}: query parameters in a bucket URI are not read; set the endpoint and region in the "
                f"environment (AWS_ENDPOINT_URL, AWS_REGION), the same on every node")
    if not rest.split("/", 1)[0]:
        return f"{path}: no bucket named"
    return None


def join(root: str, relative: str) -> str:
    """``root`` + ``relative`` with ``/`` (never ``os.path``: it would fold ``s3://`` into ``s3:/``)."""
    return f"{root.rstrip('/')}/{relative.lstrip('/')}"


def normalize(relative: str) -> str:
    """A manifest's relative path in POSIX form, ``..`` folded (a leading ``..`` stays: it escapes)."""
    return posixpath.normpath(relative.replace(os.sep, "/"))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(the filesystem, the path in it) for a bucket URI; the filesystem is built once per
    process and bucket."""
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    return _filesystem(scheme, bucket), rest


def folder_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(the filesystem, the path in it) of a folder that is local or in a bucket, such as
    ``run.storage_path``; a local path is returned as given."""
    return filesystem(path) if is_uri(path) else (pafs.LocalFileSystem(), path)


@functools.cache
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=60))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=SDK_ATTEMPTS)}
    if endpoint:
        protocol, _, host = endpoint.rpartition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=protocol or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        try:  # asks AWS where the bucket lives: a request that fails offline or for a bucket that is not there
            region = pafs.resolve_s3_region(bucket)
        except OSError as e:
            raise OSError(f"s3://{bucket}: the bucket's region cannot be found ({one_line(e)}); set AWS_REGION, "
                          f"and AWS_ENDPOINT_URL for an S3-compatible server") from None
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def read_bytes(uri: str, attempts: int = READ_ATTEMPTS) -> bytes:
    """The whole object. ``FileNotFoundError`` when it does not exist (at once); other errors are
    retried ``attempts`` times in all, with backoff, and the last one is raised."""
    fs, path = filesystem(uri)
    for attempt in range(attempts):
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    """Whether the object (or a folder of objects, such as a frame folder) exists."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_probe(fs: pafs.FileSystem, folder: str) -> None:
    """Write a small object (or file) under ``folder`` and delete it: whether this process may write
    there. Raises the filesystem's ``OSError`` when it may not (a bucket that is not there, no rights)."""
    probe = f"{folder.rstrip('/')}/.ppma_write_check_{uuid.uuid4().hex}"
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    fs.delete_file(probe)


def upload_folder(local: str | os.PathLike, fs: pafs.FileSystem, path: str) -> None:
    """Copy a local folder's files to ``path`` on ``fs``, one file at a time: pyarrow's threaded
    ``copy_files`` to S3 deadlocks once a folder holds more files than its IO threads
    (apache/arrow#15233, fixed in pyarrow 19; with pyarrow 17 a run's logger folder, W&B's offline
    files among them, hung the run at its first upload). Ray's own syncing does the same
    (ray-project/ray#32256)."""
    pafs.copy_files(str(local), path, destination_filesystem=fs, use_threads=False)


def list_folder(uri: str) -> list[str]:
    """The URIs of the objects directly under ``uri`` (empty when there are none)."""
    fs, path = filesystem(uri)
    scheme = uri.split("://", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File)
