"""How the jobs connect to Ray and keep its own output off the console (``ppma_ray.ray_env``)."""

import logging
import os

import pytest
import ray

from ppma_ray import ray_env


@pytest.mark.parametrize("joins", [False, True])
def test_the_preemption_watcher_runs_on_clusters_only(monkeypatch, joins):
    """A local instance has no node that anything drains: the jobs turn Ray Train's watcher off
    there (it printed a core-worker ERROR line at every run's start). A cluster keeps it, and a
    user's own setting wins either way."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(ray_env, "quiet_process", lambda: None)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    if joins:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_env.init_ray() is joins
    assert (calls[0].get("address") == "local") is not joins
    assert os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER") == (None if joins else "0")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_env.init_ray()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


def test_a_quiet_process_draws_no_ray_data_progress_bars(monkeypatch):
    """Without --verbose, a process that runs datasets itself (the driver's probes, a Tune trial's)
    shows neither Ray Data's progress bars nor its per-dataset lines; with --verbose it shows both."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)  # restored afterwards
    ray_logger = logging.getLogger("ray")
    monkeypatch.setattr(ray_logger, "level", logging.INFO)  # --verbose
    ray_env.quiet_process()
    assert ctx.enable_progress_bars
    monkeypatch.setattr(ray_logger, "level", logging.WARNING)  # what init_ray(verbose=False) sets
    handlers = [h for h in logging.getLogger("ray.data").handlers  # its console handler (the file one keeps all)
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for h in handlers:
        monkeypatch.setattr(h, "level", h.level)
    ray_env.quiet_process()
    assert not ctx.enable_progress_bars
    assert handlers and all(h.level == logging.ERROR for h in handlers)
