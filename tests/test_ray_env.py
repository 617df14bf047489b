"""How the jobs connect to Ray and keep its own output off the console (``ppma_ray.ray_env``)."""

import logging
import os

import pytest
import ray

from ppma_ray import ray_env


@pytest.mark.parametrize("joins", [False, True])
@pytest.mark.parametrize("name", sorted(ray_env.LOCAL_TRAIN_ENV))
def test_ray_train_settings_for_a_local_instance_leave_clusters_alone(monkeypatch, joins, name):
    """A local instance: no preemption watcher (nothing drains its node; it printed a core-worker
    ERROR line at every run's start) and the controller polls its workers every 0.25 s, not every
    2 s (each report waited for the poll). A cluster keeps Ray's defaults, and a user's own setting
    wins either way."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(ray_env, "quiet_process", lambda: None)
    monkeypatch.delenv(name, raising=False)
    if joins:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_env.init_ray() is joins
    assert (calls[0].get("address") == "local") is not joins
    assert os.environ.get(name) == (None if joins else ray_env.LOCAL_TRAIN_ENV[name])
    monkeypatch.setenv(name, "7")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_env.init_ray()
    assert os.environ[name] == "7"


def test_a_cpu_count_for_a_local_instance_is_said_not_dropped_when_joining_a_cluster(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(ray_env, "quiet_process", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ray_env.init_ray(num_cpus=4)
    assert "num_cpus" not in calls[0]
    assert "note: RAY_ADDRESS is set, so this joins that cluster and uses its nodes' CPUs; num_cpus=4 is for a local " \
           "instance" in capsys.readouterr().err
    ray_env.init_ray()
    assert capsys.readouterr().err == ""


def test_ray_train_controllers_of_a_local_instance_see_its_settings(ray_session):
    """Started after ``init_ray`` set them, the instance's worker processes (Ray Train's controller
    among them) have the driver's settings in their environment."""

    @ray_session.remote(num_cpus=0)
    def env() -> dict:
        return {name: os.environ.get(name) for name in ray_env.LOCAL_TRAIN_ENV}

    assert ray_session.get(env.remote()) == {name: os.environ[name] for name in ray_env.LOCAL_TRAIN_ENV}


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
