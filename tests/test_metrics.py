"""What a stage logs, in every logger of ``run.loggers``, read back with each tool's own reader,
offline (W&B offline mode, MLflow's SQLite store): no network."""

import json

import pytest

from ppma_ray.train.metrics import MetricsLog

CONFIG = {"run": {"name": "r", "loggers": ["wandb"]}, "mae": {"epochs": 2, "optim": {"lr": 1.5e-4}}}


def _log_two_steps(log: MetricsLog) -> None:
    log.write(2, {"loss": 1.0, "lr": 0.1, "data_failures": {"nohuman": {"videos": 8}}})
    log.write(2, {"event": "resumed"})  # not a number: the JSON lines only
    log.write(4, {"loss": 0.5, "lr": 0.05})
    log.close()


def test_jsonl_and_tensorboard_by_default(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_two_steps(MetricsLog(tmp_path / "r-mae", "mae"))
    lines = [json.loads(x) for x in (tmp_path / "r-mae/mae_metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x.get("loss")) for x in lines] == [(2, 1.0), (2, None), (4, 0.5)]
    events = EventAccumulator(str(tmp_path / "r-mae/tensorboard/mae"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 1.0), (4, 0.5)]
    assert not (tmp_path / "r-mae/wandb").exists() and not (tmp_path / "r-mae/mlflow.db").exists()


@pytest.mark.integration  # starts MLflow's store (seconds)
def test_mlflow_records_the_steps_and_the_config_as_parameters(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log_two_steps(MetricsLog(tmp_path / "r-mae", "mae", ["mlflow"], "r-mae", CONFIG))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'r-mae/mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ppma_ray").experiment_id])
    assert run.info.run_name == "r-mae" and run.data.params["mae.optim.lr"] == "0.00015"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(2, 1.0), (4, 0.5)]
    assert not (tmp_path / "r-mae/mae_metrics.jsonl").exists()  # only the loggers asked for


@pytest.mark.integration  # starts W&B's service process
def test_wandb_offline_writes_a_run_that_wandb_sync_can_upload(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path / "r-mae", "mae", ["wandb"], "r-mae", CONFIG)
    run = log.wandb
    assert run.id == "r-mae" and run.name == "r-mae" and run.config["mae.optim.lr"] == 1.5e-4
    log.write(2, {"loss": 1.0, "event": "resumed"})
    log.write(4, {"loss": 0.5})
    # W&B commits a step's row when a later step arrives (the last one at close): step 2's is in
    assert run.summary["loss"] == 1.0 and run.summary["_step"] == 2
    log.close()
    # what `wandb sync` uploads (its records are written by W&B's own service process, in its own time)
    assert list((tmp_path / "r-mae/wandb").glob("offline-run-*-r-mae/run-r-mae.wandb"))
