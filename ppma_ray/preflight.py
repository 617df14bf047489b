"""Checks on the connected Ray cluster before a long run: resources, shared storage, data reachability.

``cheap_checks`` needs no tasks (``jobs/pretrain.py`` runs it before training); ``full_checks`` also
runs a probe task on every alive node. Each check gives a ``Check(name, ok, detail)``.

On an autoscaling cluster (the YAMLs in ``cluster/`` start with a CPU-only head and no workers) the
resources a run needs appear only once something asks for them: ``wait_for_resources`` asks the
autoscaler (``request_resources``) and waits, up to ``scaling.resource_wait_s``.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ppma_ray.config import PretrainConfig
from ppma_ray.data import objectstore
from ppma_ray.errors import one_line


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def resource_bundles(cfg: PretrainConfig) -> list[dict]:
    """What a run needs from the cluster: one bundle per training worker, one CPU to decode."""
    return [cfg.scaling.worker_bundle()] * cfg.scaling.num_workers + [{"CPU": 1}]


def resource_checks(cfg: PretrainConfig) -> list[Check]:
    s = cfg.scaling
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    out = []
    if s.use_gpu:
        out.append(Check("GPUs", gpus >= s.num_workers, f"{s.num_workers} workers x 1 GPU needed, cluster has {gpus:g}"))
    need = s.num_workers * s.cpus_per_worker + 1
    out.append(Check("CPUs", cpus >= need,
                     f"{s.num_workers} x {s.cpus_per_worker} CPUs for training + >= 1 for decoding = {need:g}; cluster has {cpus:g}"))
    for name, amount in sorted(s.worker_resources.items()):
        have = res.get(name, 0.0)
        out.append(Check(f"resource {name}", have >= s.num_workers * amount,
                         f"{s.num_workers} workers x {amount:g} needed (scaling.worker_resources), cluster has {have:g}"))
    return out


def wait_for_resources(cfg: PretrainConfig, timeout_s: float, poll_s: float = 2.0,
                       say: Callable[[str], None] = print) -> list[Check]:
    """The resource checks, after asking the autoscaler for the run's bundles and waiting up to
    ``timeout_s`` for them to pass (0: no wait). The request is withdrawn when the wait ends, so it
    does not hold the cluster at that size after the run: the run's own demand keeps its nodes."""
    checks = resource_checks(cfg)
    if all(c.ok for c in checks) or timeout_s <= 0:
        return checks
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=resource_bundles(cfg))
    start = time.monotonic()
    last_said = -float("inf")
    try:
        while not all(c.ok for c in checks) and time.monotonic() - start < timeout_s:
            waited = time.monotonic() - start
            if waited - last_said >= 30:
                missing = "; ".join(c.detail for c in checks if not c.ok)
                say(f"waiting for the cluster to scale up ({waited:.0f} of {timeout_s:g} s, scaling.resource_wait_s): {missing}")
                last_said = waited
            time.sleep(poll_s)
            checks = resource_checks(cfg)
    finally:
        request_resources(bundles=[])
    return checks


def cheap_checks(cfg: PretrainConfig, wait_s: float = 0.0) -> list[Check]:
    """Resources (waiting up to ``wait_s`` for an autoscaler to provide them) and, on several nodes,
    shared storage."""
    out = wait_for_resources(cfg, wait_s)
    if not all(c.ok for c in out) and wait_s > 0:
        out.append(Check("autoscaling", False, f"the cluster did not provide the resources within {wait_s:g} s "
                                               "(scaling.resource_wait_s; check the node types' max_workers and quotas)"))
    nodes = _alive_nodes()
    if len(nodes) > 1 and not objectstore.is_uri(cfg.run.storage_path):
        # several nodes write checkpoints: a local path must be one shared filesystem (NFS, ...)
        out += storage_checks(cfg.run.storage_path)
    return out


@ray.remote(num_cpus=0)
def _probe_node(storage_path: str, marker: str, sample_paths: list[str]) -> dict:
    """Runs on one node: can it write to storage, does it see the driver's marker, and the data
    (local files, or objects in a bucket)?"""
    import pyarrow.fs as pafs

    out = {"node": ray.get_runtime_context().get_node_id()[:8], "write": "", "marker": False, "missing": []}
    try:
        fs, root = objectstore.folder_filesystem(storage_path)
        fs.create_dir(root, recursive=True)
        objectstore.write_probe(fs, root)
        out["marker"] = fs.get_file_info(f"{root.rstrip('/')}/{marker}").type != pafs.FileType.NotFound
    except Exception as e:  # any failure is the answer
        out["write"] = one_line(e, 300)
    out["missing"] = [p for p in sample_paths if not _reachable(p)]
    return out


def _reachable(path: str) -> bool:
    """Whether this node sees a data file: on its filesystem, or in its bucket with this node's
    credentials and endpoint (a node without them cannot read the object)."""
    if not objectstore.is_uri(path):
        return os.path.exists(path)
    try:
        return objectstore.exists(path)
    except OSError:
        return False


def storage_checks(path: str, samples: list[str] | None = None) -> list[Check]:
    """A probe on every node: ``path`` writable there and shared with the driver (a marker written
    here is visible there); with ``samples``, also whether those data files exist there."""
    out: list[Check] = []
    samples = samples or []
    marker = f".preflight-marker-{uuid.uuid4().hex}"
    try:
        fs, root = objectstore.folder_filesystem(path)
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root.rstrip('/')}/{marker}") as f:
            f.write(b"ok")
    except Exception as e:
        out.append(Check("storage writable (driver)", False, f"{path} is not writable: {one_line(e, 300)}"))
        return out
    try:
        refs = [_probe_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path, marker, samples)
                for n in _alive_nodes()]
        results = ray.get(refs, timeout=300)
    finally:
        try:
            fs.delete_file(f"{root.rstrip('/')}/{marker}")
        except Exception:
            pass
    for r in results:
        out.append(Check(f"storage writable on node {r['node']}", not r["write"], r["write"] or path))
        out.append(Check(f"storage shared with node {r['node']}", r["marker"],
                         "sees the driver's files" if r["marker"] else f"{path} on that node is not the driver's {path}"))
    if samples:
        missing = sorted({p for r in results for p in r["missing"]})
        out.append(Check("data reachable from workers", not missing,
                         f"{len(samples)} sampled files on {len(results)} node(s)" + (f"; missing: {missing[:5]}" if missing else "")))
    return out


def full_checks(cfg: PretrainConfig, sample_per_source: int = 20, wait_s: float = 0.0) -> list[Check]:
    """Resources (waiting up to ``wait_s`` for an autoscaler), storage on every node, and a sample of
    every source's files from every node."""
    from ppma_ray.train.data import resolve_sources

    out = [c for c in cheap_checks(cfg, wait_s) if not c.name.startswith("storage")]
    samples: list[str] = []
    try:
        for r in resolve_sources(cfg.data, sorted(set(cfg.mae.source_names()) | set(cfg.align.source_names()))):
            samples += r.train.table.column("path").to_pylist()[:sample_per_source]
    except Exception as e:
        out.append(Check("manifests", False, str(e)))
    return out + storage_checks(cfg.run.storage_path, samples)


def format_table(checks: list[Check]) -> str:
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail} |" for c in checks]
    return "\n".join(lines)
