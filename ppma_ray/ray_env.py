"""Connecting to Ray the same way from a laptop, a test and ``ray job submit``."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import ray

# Ray kills an idle worker process after 1 s once there are more workers than CPUs. A worker that
# decoded clips or extracted features has imported torch, torchvision and timm (about 6 CPU-seconds
# on a laptop core); the next stage, probe or Tune trial starts seconds later and would pay that again
# in fresh processes. Kept for 5 minutes, they are reused: a linear probe after a stage-2 run drops
# from about 18 CPU-seconds to under 1 on 2 cores. It costs memory only while they are idle
# (a few hundred MB each). Local instances only: a cluster node has as many CPUs as it runs workers.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 300_000}

# Ray Train settings for a local instance (a user's own setting wins; clusters keep Ray's defaults),
# set before it starts, so that its processes (Ray Train's controllers among them) inherit them.
LOCAL_TRAIN_ENV = {
    # Nothing drains a node of a local instance, so the preemption watcher (an actor per run, and on
    # Ray 2.60 a core-worker ERROR line about its arguments on the console at every run's start) has
    # nothing to watch.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The controller polls its workers every 2 s, and a worker's ``ray.train.report`` waits until the
    # previous report was polled (a one-slot queue): a run that reports more often than every 2 s
    # (short PBT rounds, the tests' tiny runs) waits up to 2 s per report, and every run's end is
    # seen up to 2 s late. A poll is one small call per worker; a worker that misses one is only failed after
    # RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 minutes), so polling more often fails nothing sooner.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def init_ray(num_cpus: int | None = None, verbose: bool = True, **kwargs) -> bool:
    """Join the cluster when there is one to join, otherwise start a local instance. Returns True
    when it joined a cluster (one that may have an autoscaler), False for a local instance.

    Under ``ray job submit`` (``RAY_ADDRESS`` is set) a bare ``ray.init()`` joins the cluster.
    Locally we pass ``address="local"``: a bare ``ray.init()`` would try to join whatever a stale
    ``/tmp/ray`` session file points at, and hang.

    ``verbose=False`` (the jobs without ``--verbose``) keeps Ray's own messages off the console:
    start-up lines, Ray Data's per-dataset lines, Ray Train's per-report lines and the controller's
    tracebacks (the job prints one line per failure, naming the saved traceback). Errors still show.
    Everything still goes to Ray's log files (``/tmp/ray/session_latest/logs``).
    """
    if ray.is_initialized():
        return bool(os.environ.get("RAY_ADDRESS"))
    if not verbose:
        # the driver's ``ray`` logger, and through the job config every worker's root and ``ray``
        # loggers (those of the Train controller, Train workers, Tune trials, decode tasks)
        kwargs.setdefault("logging_level", logging.WARNING)
        kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="ERROR"))
    if os.environ.get("RAY_ADDRESS"):
        if num_cpus is not None:  # e.g. validate_data --num-cpus: said, not dropped
            print(f"note: RAY_ADDRESS is set, so this joins that cluster and uses its nodes' CPUs; num_cpus={num_cpus} "
                  "is for a local instance", file=sys.stderr, flush=True)
        ray.init(**kwargs)
    else:
        for name, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _system_config=LOCAL_SYSTEM_CONFIG,
                 **kwargs)
    quiet_process()
    return bool(os.environ.get("RAY_ADDRESS"))


def quiet() -> bool:
    """Whether this process was started without ``--verbose`` (its ``ray`` logger is above INFO:
    ``init_ray(verbose=False)`` set it in the driver and, through the job config, in every worker)."""
    return logging.getLogger("ray").getEffectiveLevel() > logging.INFO


def quiet_process() -> None:
    """In a quiet process (the driver after ``init_ray``, a Train worker when its loop starts, a Tune
    trial when it starts), the loggers Ray configures for itself, past the job's ``logging_config``,
    show warnings or errors only; their log files keep everything they kept.

    * Ray Data logs each dataset's start, plan and end on its own console handler (its logger does
      not follow the ``ray`` logger): errors only.
    * Ray Train sets a worker's root logger back to INFO, and logs its line per report through a
      logger named after its source file (so not under ``ray.train``, whose level the run's
      ``LoggingConfig`` sets): the root logger goes to WARNING.
    * Ray Data draws progress bars for every dataset a process runs (a Tune trial's probes drew
      hundreds of lines into ``tune_mix``'s console): off.
    """
    if not quiet():
        return
    data = importlib.import_module("ray.data")  # configures the ``ray.data`` logger on import
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    data.DataContext.get_current().enable_progress_bars = False
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))


def reserved_device():
    """The torch device this process may use: inside a Ray task or actor, a GPU only if Ray assigned
    it one (Ray then shows it as ``cuda``); a process that reserved none runs on the CPU, even on a
    GPU node, rather than on ``cuda:0`` beside another job's trainer. Outside Ray: any GPU there is."""
    import torch

    in_ray_worker = ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    if in_ray_worker:
        return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
