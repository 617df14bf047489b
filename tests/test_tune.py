"""Ray Tune: tuning splits; a tiny grid experiment end to end with resume and a failing trial; PBT
over the stage-2 proportion is in test_tune_pbt.py (its own file, so a second test worker runs it
beside this one)."""

import csv
import os
from pathlib import Path

import pytest
import yaml

from conftest import TUNE

from ppma_ray.data.catalog import load_split
from ppma_ray.data.demo import make_demo
from ppma_ray.data.manifest import read_manifest
from ppma_ray.tune.splits import group_keys, group_split



@pytest.mark.parametrize("source", ["ucf101", "demo"])
def test_tuning_split_keeps_groups_together_and_never_touches_the_test_list(source, demo_root):
    if source == "ucf101":
        train, test = load_split("ucf101", "train"), load_split("ucf101", "val")
    else:
        m = make_demo(demo_root, seed=0)
        train, test = read_manifest(m["motion"]["train"]), read_manifest(m["motion"]["val"])
    tr, va = group_split(train, 0.2, seed=42)
    assert tr.num_rows + va.num_rows == train.num_rows and 0.15 < va.num_rows / train.num_rows < 0.3
    assert not set(group_keys(tr)) & set(group_keys(va))
    tuning = set(tr.column("path").to_pylist()) | set(va.column("path").to_pylist())
    assert tuning == set(train.column("path").to_pylist()) and not tuning & set(test.column("path").to_pylist())
    again = group_split(train, 0.2, seed=42)[1]
    assert again.column("path").to_pylist() == va.column("path").to_pylist()


def _rows(out):
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_weight_mixing_averages_the_best_finished_end_trials_or_says_why_it_cannot():
    from ppma_ray.tune.grid import mixing_ends

    def row(p, status, objective=None, lr=None):
        return {"phase": "mix", "p": p, "status": status, "objective": objective, "lr": lr, "stage2_checkpoint": f"{p}-{lr}"}

    rows = [row(0.0, "done", 0.5, 0.1), row(0.0, "done", 0.7, 0.2), row(0.5, "failed"), row(1.0, "done", 0.6, 0.1),
            row(1.0, "failed", None, 0.2)]
    ends = mixing_ends(rows)  # tune.extra grids: several trials at each end, the best taken
    assert ends[0.0]["stage2_checkpoint"] == "0.0-0.2" and ends[1.0]["stage2_checkpoint"] == "1.0-0.1"
    assert mixing_ends([row(0.0, "done", 0.5), row(1.0, "stopped")]) == \
        "weight mixing skipped: no finished stage-2 model at p = 1 (its trial stopped; see trials.csv)"
    assert "at p = 0 (its trial failed / stopped;" in mixing_ends([row(0.0, "stopped"), row(0.0, "failed"), row(1.0, "done", 0.1)])


def test_a_rerun_with_another_config_is_refused_before_it_restores_the_experiments(tmp_path, monkeypatch):
    """Tune restores the experiments of run.name with their trials whatever the config says now; the
    job compares the config with the record the experiments started with (paths made absolute)."""
    from conftest import DEMO_CONFIG

    from ppma_ray.config import ConfigError, load_config
    from ppma_ray.tune.checks import check_restore, write_record

    monkeypatch.chdir(tmp_path)
    cfg = lambda *sets: load_config(DEMO_CONFIG, ["run.storage_path=runs", "run.name=mix", *sets])  # noqa: E731
    check_restore(cfg(), None)  # no experiment yet
    write_record(cfg(), None)
    assert (tmp_path / "runs" / "mix-tune.json").is_file()
    check_restore(cfg("tune.p_values=[0.0, 0.25, 1.0]"), None)  # the record alone: nothing Tune would restore
    (tmp_path / "runs" / "mix-tune-mix").mkdir()  # the grid experiment's folder
    check_restore(cfg("scaling.num_workers=2", "run.log_every=5", "tune.max_concurrent_trials=2"), None)  # bookkeeping
    check_restore(cfg(f"run.storage_path={tmp_path / 'runs'}"), None)  # the same folder, written absolute
    with pytest.raises(ConfigError, match=r"mix-tune.json: the Tune experiments of run.name 'mix' ran with another "
                                          r"config \(tune.p_values: \[0.0, 0.5, 1.0\] there, \[0.0, 0.25, 1.0\] now\)"):
        check_restore(cfg("tune.p_values=[0.0, 0.25, 1.0]"), None)
    with pytest.raises(ConfigError, match=r"stage 1: None there, '/w/mae.safetensors' now"):
        check_restore(cfg(), "/w/mae.safetensors")
    check_restore(cfg("run.name=other", "tune.p_values=[0.0, 0.25, 1.0]"), None)  # another run: its own record
    (tmp_path / "runs" / "mix-tune-mix").rmdir()  # deleted to start over, as the error suggests
    check_restore(cfg("tune.p_values=[0.0, 0.25, 1.0]"), None)


def test_a_torn_or_missing_tune_record_is_named_not_a_traceback_or_silence(tmp_path, monkeypatch, capsys):
    """A record cut short (a kill while an older version wrote it in place) stops the re-run with one
    line saying what to delete; experiments without a record are restored with a warning that they
    go unchecked. The record itself is written in one step (no temporary file left beside it)."""
    from conftest import DEMO_CONFIG

    from ppma_ray.config import ConfigError, load_config
    from ppma_ray.tune.checks import check_restore, write_record

    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO_CONFIG, ["run.storage_path=runs", "run.name=mix"])
    write_record(cfg, None)
    record = tmp_path / "runs" / "mix-tune.json"
    assert sorted(p.name for p in record.parent.iterdir()) == ["mix-tune.json"]
    (tmp_path / "runs" / "mix-tune-avg").mkdir()
    text = record.read_text()
    record.write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match=r"mix-tune.json: unreadable \(.*line \d+ column \d+.*\), so this re-run cannot "
                                          r"be checked .*delete the file to restore them unchecked, or delete "
                                          r"runs/mix-tune-\* to start over"):
        check_restore(cfg, None)
    record.write_text("[]")  # JSON, but not a record
    with pytest.raises(ConfigError, match="unreadable"):
        check_restore(cfg, None)
    write_record(cfg, None)  # the first run writes it again before its experiments start
    check_restore(cfg, None)
    assert capsys.readouterr().err == ""
    record.unlink()
    check_restore(cfg, None)
    assert "mix-tune.json is missing, so the Tune experiments of run.name 'mix' that this run restores are not " \
           "checked" in capsys.readouterr().err


@pytest.mark.integration
def test_tiny_experiment_writes_outputs_records_a_failure_and_resumes(ray_session, stage1, tiny_config, tune_task, tmp_path,
                                                                       capfd, monkeypatch):
    from ppma_ray.tune.search import run_experiment

    sets = TUNE + tune_task + ["run.name=t", "align.samples_per_epoch=32"]
    first = tiny_config(*sets, *["tune.p_values=[0.0, 0.5, 1.0]", "tune.fail_p=0.5",
                                                                 "tune.alpha_values=[]", "tune.learned_alpha=false"])
    out = tmp_path / "out"
    monkeypatch.chdir(Path(stage1).parent)  # stage 1 given relative to here, as on a command line: the
    run_experiment(first, out, stage1=Path(stage1).name)  # trials, in folders of their own, still find it
    monkeypatch.undo()
    rows = _rows(out)
    assert sorted((r["phase"], float(r["p"]), r["status"]) for r in rows) == [
        ("mix", 0.0, "done"), ("mix", 0.5, "failed"), ("mix", 1.0, "done")]
    stage2_dirs = sorted(p.name for p in (tmp_path / "runs").glob("t-mix_trial*"))
    assert len(stage2_dirs) == 2
    progress = [x for x in capfd.readouterr().out.splitlines() if x.startswith("[tune] ")]
    assert [x.split(" trials")[0] for x in progress] == ["[tune] 1/3", "[tune] 2/3", "[tune] 3/3"], progress
    assert "(1 failed)" in progress[-1] and progress[-1].endswith("eta 0s"), progress

    # the same command again, now with the averaging phase: finished trials are not run again
    second = tiny_config(*sets, *["tune.p_values=[0.0, 0.5, 1.0]", "tune.fail_p=0.5",
                                                                  "tune.alpha_values=[0.5]", "tune.learned_alpha=false"])
    mtimes = {d: os.path.getmtime(tmp_path / "runs" / d) for d in stage2_dirs}
    run_experiment(second, out, stage1=stage1)
    assert sorted(p.name for p in (tmp_path / "runs").glob("t-mix_trial*")) == stage2_dirs
    assert {d: os.path.getmtime(tmp_path / "runs" / d) for d in stage2_dirs} == mtimes
    rows = _rows(out)
    assert [(r["phase"], float(r["alpha"])) for r in rows if r["phase"] == "avg"] == [("avg", 0.5)]
    done = [r for r in rows if r["objective"]]
    assert all(0.0 <= float(r["objective"]) <= 1.0 for r in done) and all(r["lp_top1/motion"] for r in done)
    best = max(done, key=lambda r: float(r["objective"]))
    header = (out / "best.yaml").read_text().splitlines()[0]
    assert best["trial"] in header and f"{float(best['objective']):.4f}" in header
    cfg = yaml.safe_load((out / "best.yaml").read_text())
    assert set(cfg["align"]["mix"]) == {"nohuman", "synthetic"} and (out / "tune.png").stat().st_size > 1000
