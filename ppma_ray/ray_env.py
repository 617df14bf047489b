"""Connecting to Ray the same way from a laptop, a test and ``ray job submit``."""

from __future__ import annotations

import os

import ray


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster when there is one to join, otherwise start a local instance.

    Under ``ray job submit`` (``RAY_ADDRESS`` is set) a bare ``ray.init()`` joins the cluster.
    Locally we pass ``address="local"``: a bare ``ray.init()`` would try to join whatever a stale
    ``/tmp/ray`` session file points at, and hang.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
