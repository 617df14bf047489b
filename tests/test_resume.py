"""Bit-exact resume on Ray Train: after a stop, over damaged checkpoints, after a worker failure,
and from a given checkpoint (``--resume-from``)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _final_weights, _metrics

from ppma_ray.train.checkpoint import (CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, STATE_FILE, checkpoint_problem,
                                      save_checkpoint)
from ppma_ray.train.config import RunOptions
from ppma_ray.train.runner import resolve_paths, run_stage


SCHEDULE = "align.mix_schedule=[[1, {nohuman: 0.0, synthetic: 1.0}]]"


@pytest.mark.integration
def test_resume_restart_and_rounds_all_reach_the_uninterrupted_weights(ray_session, tiny_config, tmp_path):
    """One stage-2 run with a mix schedule, bit for bit the same uninterrupted (a) and interrupted
    every way in one lineage (b-d), three Ray Train runs in all:
    (a) the whole run (12 steps, a checkpoint every 2), its final weights the reference;
    (b) then its run folder damaged: the checkpoints after step 4 deleted, though Ray's run record
        lists them (lost storage), and step 4's cut short (a crash during the write);
    (c) the same command again, as ``jobs/pretrain.py``, uploading checkpoints asynchronously: it
        passes over the damaged checkpoints, resumes from step 2, and is sent SIGTERM (``ray job
        stop``, a pod eviction) while it starts: the workers stop at their next log step (4) with a
        checkpoint of it, uploaded before the job exits 143 saying where to resume;
    (d) ``jobs/pretrain.py --resume-from`` that checkpoint, in a new run folder (PBT's rounds
        continue each other's checkpoints this way), where a worker raises once at step 9 and Ray
        restarts it from step 8."""
    from conftest import TINY

    from ppma_ray.cli import pretrain as job
    from ppma_ray.train.loop import checkpoint_staging

    common = ["align.epochs=2", "align.batch_size=8", "align.samples_per_epoch=48", "run.checkpoint_every=2",
              "run.keep=10", "align.mix={nohuman: 0.5, synthetic: 0.5}", SCHEDULE, "eval.tasks=[]",
              "align.random_erase=0.5"]  # its boxes come from Python's random: reseeded per step too
    reference = run_stage(resolve_paths(tiny_config(*common, "run.name=resumed")), RunOptions("align"))
    assert reference["steps"] == 12
    ref_w = _final_weights(reference)
    run_dir = tmp_path / "runs/resumed-align"
    ref_lr = {m["step"]: m["lr"] for m in _metrics(run_dir, "align") if "lr" in m}
    by_step = {torch.load(d / STATE_FILE, weights_only=True)["step"]: d for d in run_dir.glob("checkpoint_*") if d.is_dir()}
    assert sorted(by_step) == [2, 4, 6, 8, 10, 12]
    for step in (6, 8, 10, 12):
        shutil.rmtree(by_step[step])  # gone, though Ray's run record lists them
    weights = (by_step[4] / MODEL_FILE).read_bytes()
    (by_step[4] / MODEL_FILE).write_bytes(weights[: len(weights) // 2])  # cut short

    sets = [*TINY, f"run.storage_path={tmp_path / 'runs'}", f"data.demo_root={tiny_config().data.demo_root}", *common]
    gone = ", ".join(sorted(by_step[s].name for s in (6, 8, 10, 12)))
    staging = checkpoint_staging("resumed-align")
    shutil.rmtree(staging, ignore_errors=True)
    at_step_4 = _sigterm_as_it_resumes(ray_session, tmp_path, [*sets, "run.name=resumed", "run.checkpoint_upload=async"],
                                       gone)
    assert staging.is_dir() and not list(staging.iterdir())  # written there, uploaded, then removed
    logged = _metrics(run_dir, "align")
    marker = [i for i, m in enumerate(logged) if m.get("event") == "resumed"]
    assert [logged[i]["step"] for i in marker] == [2]
    assert [m["step"] for m in logged[marker[0]:] if "loss" in m] == [4]  # step 4 redone after the marker

    assert job.main(["--resume-from", str(at_step_4), "--output-dir", str(tmp_path / "r2"),
                     *[a for x in [*sets, "run.name=r2", "run.fail_at_step=9", "run.max_failures=1"]
                       for a in ("--set", x)]]) == 0
    round2 = json.loads((tmp_path / "r2/results.json").read_text())["stages"]
    assert list(round2) == ["align"] and round2["align"]["steps"] == 12
    assert (tmp_path / "runs/r2-align/failed_at_9").exists()
    logged = _metrics(tmp_path / "runs/r2-align", "align")
    assert [m["step"] for m in logged if m.get("event") == "resumed"] == [4, 8]  # continued, then 8 after the failure
    lines = [m for m in logged if "loss" in m]
    assert [m["step"] for m in lines] == [6, 8, 10, 12]  # none skipped
    assert all(m["lr"] == pytest.approx(ref_lr[m["step"]]) for m in lines)

    weights = _final_weights(round2["align"])
    assert all(torch.equal(ref_w[k], weights[k]) for k in ref_w)


def _checkpoints(tmp_path, n: int = 3) -> list[Path]:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    return [save_checkpoint(tmp_path / f"checkpoint_2026-01-01_00-00-0{i}", model, opt, {"step": 2 * (i + 1)}, {})
            for i in range(n)]


@pytest.mark.parametrize("fault", ["truncated weights", "truncated state", "missing file", "bad manifest",
                                   "unsealed and truncated"])
def test_a_damaged_checkpoint_is_recognised_and_named(tmp_path, fault):
    (d,) = _checkpoints(tmp_path, 1)
    assert checkpoint_problem(d) is None
    if fault == "truncated weights":
        (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:-10])
    elif fault == "truncated state":
        (d / STATE_FILE).write_bytes((d / STATE_FILE).read_bytes()[:100])
    elif fault == "missing file":
        (d / CONFIG_FILE).unlink()
    elif fault == "bad manifest":
        (d / MANIFEST_FILE).write_text('{"model.safetens')
    else:  # written before checkpoints were sealed, or cut short before the manifest arrived
        (d / MANIFEST_FILE).unlink()
        assert checkpoint_problem(d) is None
        (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:20])
    problem = checkpoint_problem(d)
    expected = {"truncated weights": "model.safetensors has", "truncated state": "train_state.pt has",
                "missing file": "config.json is missing", "bad manifest": "manifest.json is not valid JSON",
                "unsealed and truncated": "SafetensorError"}[fault]
    assert problem and expected in problem, problem


def test_resume_passes_over_damaged_checkpoints_to_the_newest_whole_one(tmp_path):
    """Ray's newest checkpoint and the one before are damaged: the run resumes from the third,
    and with none whole it fails naming every folder and why (never a silent fresh start)."""
    import ray.train

    from ppma_ray.models.errors import CheckpointError
    from ppma_ray.train.loop import Stage, _newest_first, _resume

    first, second, newest = _checkpoints(tmp_path)
    (newest / MODEL_FILE).write_bytes(b"")
    (second / STATE_FILE).unlink()
    model = torch.nn.Linear(4, 2)
    stage = Stage(model, None, torch.optim.AdamW(model.parameters()), [], [], [])
    candidates = _newest_first(ray.train.Checkpoint(str(newest)))
    assert [Path(c.path).name for c in candidates] == [newest.name, second.name, first.name]
    assert _resume(candidates, stage, rank=0).step == 2
    (first / MODEL_FILE).write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from is usable") as e:
        _resume(candidates, stage, rank=0)
    assert all(d.name in str(e.value) for d in (first, second, newest))


def _run_folder(tmp_path, listed: int, unlisted: int) -> tuple[list[Path], "object"]:
    """A run folder as Ray leaves it: ``listed`` checkpoints in its run record, then ``unlisted``
    newer ones it never recorded (the record's update was lost)."""
    import json

    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.config import load_config

    model = torch.nn.Linear(4, 2)
    dirs = [save_checkpoint(tmp_path / f"runs/r-align/checkpoint_2026-01-01_00-00-0{i}", model, None, {"step": i + 1}, {})
            for i in range(listed + unlisted)]
    record = {"checkpoint_results": [{"checkpoint_dir_name": d.name} for d in dirs[:listed]]}
    (tmp_path / "runs/r-align/checkpoint_manager_snapshot.json").write_text(json.dumps(record))
    return dirs, load_config(DEMO_CONFIG, [*TINY, f"run.storage_path={tmp_path / 'runs'}", "run.name=r"])


def test_checkpoints_rays_record_does_not_list_are_used_when_newest_and_whole_else_removed(tmp_path, capsys):
    from ppma_ray.train.runner import RAY_SNAPSHOT, own_resume

    (old, newer, landed, cut_short), cfg = _run_folder(tmp_path, 2, 2)
    (cut_short / MODEL_FILE).write_bytes(b"")  # a write that never finished
    stale = save_checkpoint(tmp_path / "runs/r-align/checkpoint_2025-12-31_00-00-00", torch.nn.Linear(4, 2), None,
                            {"step": 0}, {})  # older than the record's, not in it
    options = own_resume(cfg, RunOptions("align", "r-align"))
    assert options.resume_from == str(landed)  # the newest whole one, though the record missed it
    assert not stale.exists() and not cut_short.exists() and old.exists() and newer.exists()
    assert not (tmp_path / f"runs/r-align/{RAY_SNAPSHOT}").exists()  # set aside
    out = capsys.readouterr().out
    assert f"removed checkpoint folder {cut_short.name}" in out and "model.safetensors has 0 bytes" in out
    assert f"removed checkpoint folder {stale.name}" in out and f"does not list the newest whole checkpoint ({landed.name})" in out

    (old2, newest2), cfg = _run_folder(tmp_path / "whole", 2, 0)
    assert own_resume(cfg, RunOptions("align", "r-align")).resume_from is None  # all listed and whole: Ray resumes


def test_a_run_folder_with_no_whole_checkpoint_fails_before_ray_trains(tmp_path):
    """Found before the stage starts, so Ray's restarts never retry it (max_failures: -1 would loop)."""
    from ppma_ray.models.errors import CheckpointError
    from ppma_ray.train.runner import own_resume

    dirs, cfg = _run_folder(tmp_path, 2, 0)
    for d in dirs:
        (d / STATE_FILE).write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no checkpoint in it is whole") as e:
        own_resume(cfg, RunOptions("align", "r-align"))
    assert all(d.name in str(e.value) for d in dirs) and "another run.name" in str(e.value)


def test_stage_2_alone_starts_from_the_newest_whole_stage_1_checkpoint(tmp_path):
    from ppma_ray.train.checkpoint import stage1_checkpoint

    assert stage1_checkpoint(str(tmp_path), "run") == (None, f"{tmp_path}/run-mae")
    older, newest = _checkpoints(tmp_path / "run-mae", 2)
    assert stage1_checkpoint(str(tmp_path), "run")[0] == str(newest)
    (newest / STATE_FILE).write_bytes(b"")
    assert stage1_checkpoint(str(tmp_path), "run")[0] == str(older)


def test_a_run_folder_given_as_a_checkpoint_resolves_to_its_newest_whole_one(tmp_path, capsys):
    """``--checkpoint`` (evaluate, averaging), ``--init-from`` (pretrain), ``--stage1`` (tune) and
    export_hf take a run folder: a newest checkpoint that a crash left torn is passed over and named;
    none whole is an error naming each."""
    from ppma_ray.cli import weights_source
    from ppma_ray.cli.export_hf import find_checkpoint
    from ppma_ray.models.errors import CheckpointError
    from ppma_ray.train.checkpoint import resolve_checkpoint, run_checkpoint

    run = tmp_path / "demo-align"
    older, newest = _checkpoints(run, 2)
    assert resolve_checkpoint(run) == newest / MODEL_FILE and weights_source("--stage1", str(run)) == str(newest / MODEL_FILE)
    assert f"--stage1: {newest} (the newest whole checkpoint of {run})\n" in capsys.readouterr().err
    assert not (tmp_path / ".demo-align.lock").exists()  # asking whether it trains leaves nothing behind
    with _hold_run(tmp_path, "demo-align") as holder:  # a run still training: its newest checkpoint is not its last
        weights_source("--stage1", str(run))
    assert (f"--stage1: {newest} (the newest whole checkpoint of {run}; that run is still training: {run} is in use by "
            f"another run (pid {holder.pid} ") in capsys.readouterr().err
    weights_source("--stage1", str(run))
    assert "still training" not in capsys.readouterr().err  # its process is gone
    (newest / MODEL_FILE).write_bytes((newest / MODEL_FILE).read_bytes()[:-10])  # a save cut short
    assert resolve_checkpoint(run) == older / MODEL_FILE
    assert f"WARNING: {newest} is not whole (model.safetensors has" in capsys.readouterr().err
    assert weights_source("--init-from", str(run)) == str(older / MODEL_FILE) and find_checkpoint(run, None) == (older, None)
    (older / STATE_FILE).write_bytes(b"")
    for resolve in (resolve_checkpoint, lambda r: find_checkpoint(r, None), lambda r: weights_source("--stage1", str(r))):
        with pytest.raises(CheckpointError, match="no checkpoint in it is whole") as e:
            resolve(run)
        assert f"{older.name}: {STATE_FILE} has 0 bytes" in str(e.value) and newest.name in str(e.value)
    assert run_checkpoint(tmp_path / "empty") is None  # no checkpoint_* folders: not a run folder


def test_evaluate_resolves_a_run_folder_once_and_runs_the_checkpoint_it_checked(tmp_path, demo_root, capsys,
                                                                                 monkeypatch):
    """``jobs/evaluate.py --checkpoint RUN`` resolves the run folder once, before Ray starts: a torn
    newest checkpoint is named once (the run does not check the sums again) and the run starts from
    the weights that were checked."""
    from conftest import TINY

    import ppma_ray.train.downstream as downstream
    from ppma_ray.cli import evaluate as job

    run = tmp_path / "demo-align"
    older, newest = _checkpoints(run, 2)
    (newest / MODEL_FILE).write_bytes((newest / MODEL_FILE).read_bytes()[:-10])
    started = []
    monkeypatch.setattr(job, "start_ray", lambda cfg, verbose: cfg)
    monkeypatch.setattr(downstream, "run_stage", lambda cfg, options: started.append(options) or
                        {"test_top1": 0.5, "test_top5": 1.0, "test_videos": 2, "test_failed": 0})
    sets = [*TINY, f"data.demo_root={demo_root}", f"run.storage_path={tmp_path / 'runs'}"]
    assert job.main(["--checkpoint", str(run), "--task", "demo:motion", "--output-dir", str(tmp_path / "out"),
                     *[a for s in sets for a in ("--set", s)]]) == 0
    assert capsys.readouterr().err.count(f"WARNING: {newest} is not whole") == 1
    (options,) = started
    assert options.init_from == str(older / MODEL_FILE) and options.run_name.endswith("-demo-align-motion-lp")


def test_init_from_and_resume_from_reach_the_workers_as_absolute_paths(tmp_path, demo_root, capsys, monkeypatch):
    """``jobs/pretrain.py --init-from`` with a relative path, to a run folder: the workers get the
    newest whole checkpoint's weights file, absolute; ``--resume-from`` with a relative path: the
    checkpoint, absolute. A Ray Train worker runs in a folder of its own, where a relative path names
    nothing (the stage failed at its start); a run folder, which ``--init-from``'s help offers, was
    refused as a folder without weights. A stage-1 checkpoint that finished its epochs is stage 2's
    start: resumed, its stage ended at once without a checkpoint, and stage 2 started from random init."""
    import contextlib

    from conftest import DEMO_CONFIG, TINY

    import ppma_ray.train.runner as runner
    import ppma_ray.train.stop as stop
    from ppma_ray.cli import pretrain as job
    from ppma_ray.config import load_config, to_dict
    from ppma_ray.train.loop import stage_model

    sets = [*TINY, f"data.demo_root={demo_root}", f"run.storage_path={tmp_path / 'runs'}", "eval.tasks=[]"]
    cfg = load_config(DEMO_CONFIG, sets)
    older, newest = [save_checkpoint(tmp_path / f"stage1/checkpoint_2026-01-01_00-00-0{i}", stage_model(cfg, "mae"), None,
                                     {"step": i + 1}, to_dict(cfg)) for i in range(2)]
    (newest / MODEL_FILE).write_bytes((newest / MODEL_FILE).read_bytes()[:-10])
    started = []
    monkeypatch.setattr(job, "start_ray", lambda cfg, verbose: cfg)
    monkeypatch.setattr(stop, "graceful_stop", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(runner, "pretrain", lambda cfg, stages, init_from, resume_from, **kw:
                        started.append((stages, init_from, resume_from)) or {})
    monkeypatch.chdir(tmp_path)
    flags = [a for s in sets for a in ("--set", s)]
    assert job.main(["--stage", "align", "--init-from", "stage1", *flags]) == 0
    err = capsys.readouterr().err
    assert f"--init-from: {older} (the newest whole checkpoint of stage1)" in err and f"WARNING: {newest} is not whole" in err
    assert job.main(["--resume-from", f"stage1/{older.name}", *flags]) == 0
    finished = save_checkpoint(tmp_path / "done/checkpoint_2026-01-01_00-00-00", stage_model(cfg, "mae"), None,
                               {"step": 9, "epoch": cfg.mae.epochs}, to_dict(cfg))
    capsys.readouterr()
    assert job.main(["--resume-from", str(finished), *flags]) == 0
    assert f"{finished} has finished stage 1 ({cfg.mae.epochs} of {cfg.mae.epochs} epochs): stage 2 starts from it" in \
        capsys.readouterr().err
    assert started == [(("align",), str(older / MODEL_FILE), None), (("mae", "align"), None, str(older)),
                       (("align",), str(finished / MODEL_FILE), None)]
    with pytest.raises(SystemExit) as e:
        job.main(["--stage", "mae", "--resume-from", str(finished), *flags])
    assert e.value.code == 2 and "its mae training has finished" in capsys.readouterr().err


def test_a_stage_resumed_from_a_finished_checkpoint_reports_that_checkpoint(tiny_config, tmp_path, monkeypatch):
    """Resumed from a checkpoint that had finished its epochs (``--resume-from`` in a bucket, or a
    run's own newest once Ray's record was set aside), a stage trains nothing and Ray reports no
    checkpoint: the one it resumed from is the stage's last, with its metrics (stage 2 starts from it)."""
    import types

    import ppma_ray.train.runner as runner

    model = torch.nn.Linear(4, 2)
    given = save_checkpoint(tmp_path / "given/checkpoint_2026-01-01_00-00-00", model, torch.optim.AdamW(model.parameters()),
                            {"step": 6, "epoch": 1, "metrics": {"step": 6, "loss": 0.5}}, {})

    class FinishedAlready:  # Ray Train's result when the loop returned before its first report
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            return types.SimpleNamespace(metrics={}, checkpoint=None)

    monkeypatch.setattr(runner, "TorchTrainer", FinishedAlready)
    monkeypatch.setattr(runner, "decode_cpu_budget", lambda cfg: 1.0)
    out = runner.run_stage(tiny_config(), RunOptions("mae", resume_from=str(given)))
    assert (out["checkpoint"], out["steps"], out["final_loss"]) == (str(given), 6, 0.5)


def test_stage_2_never_starts_from_random_init_when_stage_1_left_no_checkpoint(tiny_config, monkeypatch):
    import ppma_ray.train.runner as runner
    from ppma_ray.models.errors import CheckpointError

    ran = []
    monkeypatch.setattr(runner, "run_stage", lambda cfg, options, output_dir: ran.append(options.stage) or {"checkpoint": None})
    with pytest.raises(CheckpointError, match="mae ended without a checkpoint, so align has nothing to start from"):
        runner.pretrain(tiny_config())
    assert ran == ["mae"]


def test_a_run_folder_of_another_config_is_named_before_ray_starts(tmp_path):
    """Re-running into a folder continues its run: a changed model or stage setting is refused
    with the keys that differ; bookkeeping keys (run.*) may change."""
    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.cli import check_resume_config
    from ppma_ray.config import ConfigError, load_config, to_dict

    sets = [*TINY, f"run.storage_path={tmp_path}", "run.name=r"]
    cfg = load_config(DEMO_CONFIG, sets)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "r-mae/checkpoint_2026-01-01_00-00-00", model, None, {"step": 1}, to_dict(cfg))
    check_resume_config(cfg)  # the same config: resumes
    check_resume_config(load_config(DEMO_CONFIG, [*sets, "run.log_every=1", "run.max_steps=3"]))
    changed = load_config(DEMO_CONFIG, [*sets, "model.depth=3", "mae.optim.lr=1e-3"])
    with pytest.raises(ConfigError) as e:
        check_resume_config(changed)
    assert str(tmp_path / "r-mae") in str(e.value) and "model.depth: 2 there, 3 now" in str(e.value)
    assert "mae.optim.lr" in str(e.value) and "run.name" in str(e.value)


@pytest.mark.parametrize("case", ["damaged", "other config", "folder holds a run", "with --init-from", "wrong --stage"])
def test_resume_from_a_checkpoint_that_cannot_continue_exits_2_before_ray(tmp_path, capsys, case):
    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.cli import pretrain as job
    from ppma_ray.config import load_config, to_dict
    from ppma_ray.train.loop import stage_model

    sets = [*TINY, f"run.storage_path={tmp_path / 'runs'}", "run.name=new"]
    cfg = load_config(DEMO_CONFIG, sets)
    ckpt = save_checkpoint(tmp_path / "old-mae/checkpoint_2026-01-01_00-00-00", stage_model(cfg, "mae"), None,
                           {"step": 4}, to_dict(cfg))
    extra = []
    if case == "damaged":
        (ckpt / STATE_FILE).write_bytes(b"")
    elif case == "other config":
        extra = ["model.depth=3"]
    elif case == "folder holds a run":
        save_checkpoint(tmp_path / "runs/new-mae/checkpoint_2026-01-02_00-00-00", torch.nn.Linear(2, 2), None, {"step": 1},
                        to_dict(cfg))
    argv = ["--resume-from", str(ckpt), *[a for x in [*sets, *extra] for a in ("--set", x)]]
    argv += {"with --init-from": ["--init-from", str(ckpt)], "wrong --stage": ["--stage", "align"]}.get(case, [])
    with pytest.raises(SystemExit) as exit_:
        job.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    expected = {"damaged": "train_state.pt has 0 bytes", "other config": "model.depth: 2 there, 3 now",
                "folder holds a run": "new-mae already holds a run", "with --init-from": "leave out --init-from",
                "wrong --stage": "is a mae checkpoint, not align"}[case]
    assert expected in err, err


def test_storage_that_cannot_hold_the_run_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.cli import check_storage
    from ppma_ray.config import ConfigError, load_config

    (tmp_path / "a_file").write_text("x")
    cfg = lambda path: load_config(DEMO_CONFIG, [*TINY, f"run.storage_path={path}"])  # noqa: E731
    check_storage(cfg(tmp_path / "runs"))
    with pytest.raises(ConfigError, match=f"run.storage_path: {tmp_path}/a_file/runs is under {tmp_path}/a_file, which is a file"):
        check_storage(cfg(tmp_path / "a_file" / "runs"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"run.storage_path: .* GiB free; 3 checkpoints of this model"):
        check_storage(cfg(tmp_path / "runs"))


def test_a_failed_stage_is_one_line_per_rank_naming_its_saved_traceback(tmp_path):
    """What the driver prints when Ray Train gives up: each failed rank's error in one line and the
    file in the run folder holding its traceback (the note travels with the pickled exception)."""
    import pickle

    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback  # how Ray wraps it

    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.config import load_config
    from ppma_ray.train.runner import failure_line, note_traceback

    cfg = load_config(DEMO_CONFIG, [*TINY, f"run.storage_path={tmp_path / 'runs'}"])
    try:
        raise RuntimeError("injected failure at step 3\nsecond line")
    except RuntimeError as e:
        note_traceback(e, cfg, RunOptions('mae', 'r-mae'), rank=0)
        failed = pickle.loads(pickle.dumps(e))
    (saved,) = (tmp_path / "runs/r-mae/errors").glob("rank0-*.txt")
    assert "Traceback (most recent call last)" in saved.read_text() and "second line" in saved.read_text()
    error = WorkerGroupError("...", {1: ValueError("bad shape"), 0: UserExceptionWithTraceback(failed, "Traceback ...")})
    assert failure_line("r-mae", error) == (f"r-mae failed: rank 0: RuntimeError: injected failure at step 3 "
                                            f"(traceback: {saved}); rank 1: ValueError: bad shape")


@pytest.mark.parametrize("cause, said", [
    ("The actor is dead because its worker process has died. Worker exit type: NODE_OUT_OF_MEMORY Worker exit "
     "detail: Task was killed due to the node running low on memory.",
     "its worker process (pid 4711 on 10.0.0.5) died: Ray's memory monitor killed it, the node running low on memory"),
    ("The actor died because its node has died. Node Id: 1a2b", "its node (pid 4711 on 10.0.0.5) died"),
    ("The actor is dead because it was killed by `ray.kill`.", "its worker (pid 4711 on 10.0.0.5) died: it was killed by `ray.kill`"),
])
def test_each_way_a_worker_dies_is_named(cause, said):
    """The deaths Ray reports besides a killed process (the test below), in Ray's own words (the
    strings of its GCS): each rank's line names what happened, not Ray's health check."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from ppma_ray.train.runner import failure_line

    death = RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n"
                         f"\tactor_id: 8d94e889\n\tpid: 4711\n\tnamespace: x\n\tip: 10.0.0.5\n{cause}")
    error = WorkerGroupError("...", {0: WorkerHealthCheckFailedError("A worker health check failed.", death)})
    assert failure_line("r-mae", error) == f"r-mae failed: rank 0: {said}"


def test_a_worker_killed_mid_stage_is_said_so_and_the_same_call_resumes(ray_session, tiny_config, tmp_path):
    """A real fault: the training worker's process is killed at step 5 (SIGKILL, what the kernel's
    OOM killer sends), restarts not allowed. Ray's own first line says only "A worker health check
    failed."; the stage's line says the process died without a Python error and where the same
    command resumes. The same call then resumes from step 4 and finishes."""
    from ppma_ray.train.runner import StageFailed

    sets = ["run.name=killed", "mae.epochs=1", "mae.batch_size=8", "mae.samples_per_epoch=64", "run.checkpoint_every=2",
            "run.fail_at_step=5", "run.fail_mode=kill", "eval.tasks=[]"]
    cfg = resolve_paths(tiny_config(*sets))
    with pytest.raises(StageFailed) as failed:
        run_stage(cfg, RunOptions("mae"))
    run_dir = tmp_path / "runs/killed-mae"
    (newest,) = [d for d in run_dir.glob("checkpoint_*") if d.is_dir() and torch.load(d / STATE_FILE, weights_only=True)["step"] == 4]
    line = str(failed.value)
    assert len(line.splitlines()) == 1, line
    assert line.startswith("killed-mae failed: rank 0: its worker process (pid ") and (
        "died without a Python error: killed (by the kernel's OOM killer, kill -9 or ray stop --force) or crashed "
        f"(a segfault); the same command resumes from {newest} (step 4)") in line, line
    assert (run_dir / "failed_at_5").exists()
    summary = run_stage(cfg, RunOptions("mae"))
    assert summary["steps"] == 8
    assert [m["step"] for m in _metrics(run_dir, "mae") if m.get("event") == "resumed"] == [4]


def _sigterm_as_it_resumes(ray_session, tmp_path: Path, sets: list[str], gone: str) -> Path:
    """(c) of the test above: ``jobs/pretrain.py --stage align --random-init`` on the damaged run
    folder gets SIGTERM once it has said where it resumes (its signal handler is in place; the
    first step is seconds away), stops at step 4 (its next log step) with a whole checkpoint and
    exits 143 naming it. Returns it."""
    import os
    import signal

    from conftest import ROOT

    cmd = [sys.executable, str(ROOT / "jobs/pretrain.py"), "--stage", "align", "--random-init",
           *[a for x in sets for a in ("--set", x)]]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}  # joins, as under ray job submit
    with open(tmp_path / "stderr.txt", "w+") as stderr:  # read at the end: a pipe left unread could fill and block
        job = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=stderr)
        out = []
        for line in job.stdout:
            out.append(line)
            if "Ray's run record" in line:
                break
        assert job.poll() is None, "".join(out) + (tmp_path / "stderr.txt").read_text()[-3000:]
        job.send_signal(signal.SIGTERM)
        out.append(job.communicate(timeout=240)[0])
        out, err = "".join(out), (tmp_path / "stderr.txt").read_text()
    assert job.returncode == 143, err[-3000:]
    assert f"lists checkpoints that are gone ({gone})" in out, out
    (line,) = [x for x in err.splitlines() if x.startswith("stopped by SIGTERM")]
    assert " at step 4;" in line and line.endswith("re-run the same command to resume"), line
    checkpoint = Path(line.split("checkpoint ")[1].split(":")[0])
    assert torch.load(checkpoint / STATE_FILE, weights_only=True)["step"] == 4 and checkpoint_problem(checkpoint) is None
    # the console without --verbose: the job's progress line, none of Ray's own lines
    assert "[align] epoch 1/2 step 4/12 loss" in out and " eta " in out
    for chatter in ("Starting execution of Dataset", "Checkpoint successfully created", "Reporting training result",
                    "Failed to query Ray Train Controller", "Connecting to existing Ray cluster"):
        assert chatter not in out + err, chatter
    return checkpoint


def _hold_run(storage: Path, run_name: str):
    """Another process that trains into ``storage/run_name`` while the block runs (``hold_lock``)."""
    from conftest import hold_lock

    return hold_lock(storage / f".{run_name}.lock")


def test_a_run_folder_another_process_trains_into_is_refused_until_that_process_is_gone(tmp_path, monkeypatch):
    """Two jobs in one run folder would resume from the same checkpoints and write over each other's
    (and the second's resume would delete the first's checkpoint in progress): the second is refused,
    by the job's check and by the stage itself (a job that started in between), naming the holder.
    A killed holder leaves nothing held."""
    import socket

    from conftest import DEMO_CONFIG, TINY

    import ppma_ray.train.runner as runner
    from ppma_ray.cli import check_not_running
    from ppma_ray.config import ConfigError, load_config
    from ppma_ray.train.runner import StageFailed

    cfg = load_config(DEMO_CONFIG, [*TINY, f"run.storage_path={tmp_path / 'runs'}", "run.name=r"])
    with _hold_run(tmp_path / "runs", "r-mae") as holder:
        expected = (rf"{tmp_path}/runs/r-mae is in use by another run \(pid {holder.pid} on {socket.gethostname()} since "
                    rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d; lock {tmp_path}/runs/.r-mae.lock\)")
        with pytest.raises(ConfigError, match=expected + ": wait for it to finish, or use another run.name"):
            check_not_running(cfg, ["r-align", "r-mae"])
        check_not_running(cfg, ["r-align"])  # another stage's folder is free
        monkeypatch.setattr(runner, "decode_cpu_budget", lambda cfg: 1.0)  # no Ray needed to be refused
        monkeypatch.setattr(runner, "own_resume", lambda *a: pytest.fail("resumed a run another process holds"))
        with pytest.raises(StageFailed, match=expected):
            run_stage(cfg, RunOptions("mae"))
    check_not_running(cfg, ["r-mae"])  # the kernel released the lock of the killed process


@pytest.mark.parametrize("job_name, held", [("pretrain", "r-align"), ("tune_mix", "r-mae"), ("tune_mix", "r-tune"),
                                           ("evaluate", "r-random_init-motion-ft")])
def test_a_job_into_a_run_folder_in_use_exits_2_before_ray(tmp_path, capsys, monkeypatch, job_name, held):
    import importlib

    from conftest import DEMO_CONFIG, TINY

    job = importlib.import_module(f"ppma_ray.cli.{job_name}")
    monkeypatch.setattr(job, "start_ray", lambda *a: pytest.fail("Ray started"))
    with _hold_run(tmp_path / "runs", held) as holder, pytest.raises(SystemExit) as exit_:
        job.main(["--config", str(DEMO_CONFIG), *[a for s in [*TINY, f"run.storage_path={tmp_path / 'runs'}", "run.name=r"]
                                                 for a in ("--set", s)],
                  *(["--task", "demo:motion", "--protocol", "ft"] if job_name == "evaluate" else [])])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {tmp_path}/runs/{held} is in use by another run (pid {holder.pid} "), err


def test_stage_2_alone_says_how_far_stage_1_got_and_waits_for_a_stage_1_still_training(tmp_path, capsys, monkeypatch):
    """``--stage align`` takes stage 1's newest whole checkpoint: one from an interrupted stage 1 is
    named as such (a partly trained MAE is not the recipe), and a stage 1 that another job is
    still training is refused (its newest checkpoint is a stage 1 half way)."""
    from conftest import DEMO_CONFIG, TINY

    from ppma_ray.cli import pretrain as job
    from ppma_ray.config import load_config, to_dict
    from ppma_ray.train.loop import stage_model

    class RayStarted(Exception):
        pass

    def ray_started(*a):
        raise RayStarted

    monkeypatch.setattr(job, "start_ray", ray_started)
    sets = [*TINY, f"run.storage_path={tmp_path / 'runs'}", "run.name=r", "mae.epochs=4"]
    cfg = load_config(DEMO_CONFIG, sets)
    ckpt = save_checkpoint(tmp_path / "runs/r-mae/checkpoint_2026-01-01_00-00-00", stage_model(cfg, "mae"), None,
                           {"step": 8, "epoch": 2}, to_dict(cfg))
    argv = ["--stage", "align", *[a for s in sets for a in ("--set", s)]]
    with pytest.raises(RayStarted):
        job.main(argv)
    assert (f"stage 2 starts from stage 1's checkpoint {ckpt} (epoch 2 of 4, step 8; stage 1 did not finish, so "
            "stage 2 starts from a partly trained MAE)") in capsys.readouterr().err
    with _hold_run(tmp_path / "runs", "r-mae") as holder, pytest.raises(SystemExit) as exit_:
        job.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --stage align: stage 1 is still training ({tmp_path}/runs/r-mae is in use by another "
                          f"run (pid {holder.pid} "), err
    assert err.endswith("wait for it to finish, or pass --init-from"), err
