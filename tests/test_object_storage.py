"""Videos in object storage, against a real S3 API on localhost (moto's server): decoding from a
bucket, manifests rooted in one, faults of the network and of the objects, the validator, the
preflight, the loggers' upload, and checkpoints named by URI. Training from a bucket is in
test_train.py (its DDP run reads the synthetic set from one and stores its runs in it)."""

import csv
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from conftest import DEMO_CONFIG, TINY, upload

from ppma_ray.data import objectstore
from ppma_ray.data.manifest import ManifestError, read_manifest, write_ppma_manifest
from ppma_ray.data.video import VideoDecodeError, backend_problem, probe_video, sample_clips

DECODERS = [pytest.param(b, marks=pytest.mark.skipif(backend_problem(b) is not None, reason=str(backend_problem(b))))
            for b in ("decord", "pyav", "torchcodec")]


@pytest.mark.parametrize("backend", DECODERS)
def test_a_video_in_a_bucket_decodes_to_the_local_files_frames(s3_bucket, sample_videos, video_dir, backend):
    """Read whole into memory and decoded from there: the same frames, bit for bit, as from disk;
    a frame folder may be a prefix in the bucket."""
    local = sample_videos["bikes"]
    uri = upload(s3_bucket, local, f"{backend}/bikes.mp4")
    assert np.array_equal(sample_clips(uri, 2, 8, 1.0, backend=backend), sample_clips(local, 2, 8, 1.0, backend=backend))
    assert probe_video(uri, backend=backend) == probe_video(local, backend=backend)
    frames = upload(s3_bucket, video_dir / "frames_ok", f"{backend}/frames_ok")
    assert np.array_equal(sample_clips(frames, 1, 4, 0.4), sample_clips(video_dir / "frames_ok", 1, 4, 0.4))


def test_missing_empty_and_broken_objects_are_decode_errors_naming_the_object(s3_bucket, video_dir):
    cases = {"missing.mp4": None, "empty.mp4": "empty.mp4", "text.mp4": "text.mp4", "truncated.mp4": "truncated.mp4",
             "frames_gap": "frames_gap"}
    expected = {"missing.mp4": "object does not exist", "empty.mp4": "file is empty", "text.mp4": "cannot open video",
                "truncated.mp4": "", "frames_gap": "missing frame number 3"}
    for key, local in cases.items():
        uri = f"{s3_bucket}/broken/{key}" if local is None else upload(s3_bucket, video_dir / local, f"broken/{key}")
        with pytest.raises(VideoDecodeError) as e:
            probe_video(uri)
        assert e.value.path == uri and expected[key] in e.value.reason, (key, e.value.reason)


class FlakyProxy:
    """A TCP proxy in front of the S3 server that drops the first ``drop`` connections (closed as
    soon as accepted: the client sees the connection reset) and forwards the rest."""

    def __init__(self, target_port: int, drop: int):
        self.drop, self.target = drop, target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.drop:
                self.drop -= 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # linger 0: a reset, as a dropped connection
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.server.close()


def test_dropped_connections_are_retried_and_a_lasting_outage_is_a_decode_error(s3_bucket, sample_videos, monkeypatch):
    import os

    uri = upload(s3_bucket, sample_videos["bikes"], "flaky/bikes.mp4")
    expected = probe_video(uri)
    s3_port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = FlakyProxy(s3_port, drop=3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    objectstore._filesystem.cache_clear()  # built per process from the environment: rebuild it on the proxy
    try:
        assert probe_video(uri) == expected and proxy.drop == 0  # three resets, then read whole
        # an outage outlasting every retry (fewer and shorter here, to keep the test short)
        monkeypatch.setattr(objectstore, "SDK_ATTEMPTS", 1)
        monkeypatch.setattr(objectstore, "BACKOFF_S", 0.01)
        objectstore._filesystem.cache_clear()
        proxy.drop = 10**6
        with pytest.raises(VideoDecodeError, match="cannot read the object"):
            probe_video(uri)
        assert proxy.drop == 10**6 - objectstore.READ_ATTEMPTS  # one connection per attempt: retried here
    finally:
        proxy.close()
        objectstore._filesystem.cache_clear()


def test_a_manifest_rooted_in_a_bucket_joins_its_paths_there_and_keeps_them_inside(tmp_path):
    (tmp_path / "train.csv").write_text("a/x.mp4;0\n./b//y.mp4;1\n")
    table = read_manifest(tmp_path / "train.csv", root="s3://bucket/data/")
    assert table.column("path").to_pylist() == ["s3://bucket/data/a/x.mp4", "s3://bucket/data/b/y.mp4"]
    write_ppma_manifest(table, tmp_path / "again.csv", root="s3://bucket/data")
    assert (tmp_path / "again.csv").read_text() == "a/x.mp4;0\nb/y.mp4;1\n"
    for line, problem in (("a/../../x.mp4;0", "escapes the root"), ("s3://other/x.mp4;0", "is absolute")):
        (tmp_path / "bad.csv").write_text(line + "\n")
        with pytest.raises(ManifestError, match=problem):
            read_manifest(tmp_path / "bad.csv", root="s3://bucket/data")
    (tmp_path / "uris.csv").write_text("s3://bucket/data/a/x.mp4;0\n")  # without a root, URIs as written
    assert read_manifest(tmp_path / "uris.csv").column("path").to_pylist() == ["s3://bucket/data/a/x.mp4"]


@pytest.fixture(scope="module")
def bucket_source(s3_bucket, demo_root, tmp_path_factory) -> tuple[Path, str, str]:
    """(local manifest, bucket root, missing path): 7 demo no-human videos in the bucket, listed
    with one that is not there."""
    lines = (demo_root / "nohuman/train.csv").read_text().splitlines()[:7]
    for line in lines:
        path = line.split(";")[0]
        upload(s3_bucket, demo_root / "nohuman" / path, f"nohuman/{path}")
    manifest = tmp_path_factory.mktemp("bucket") / "train.csv"
    manifest.write_text("\n".join([*lines, "train/gone.mp4;0"]) + "\n")
    return manifest, f"{s3_bucket}/nohuman", "train/gone.mp4"


@pytest.mark.integration
def test_validate_data_and_preflight_read_the_bucket_and_name_the_missing_object(ray_session, bucket_source, tmp_path):
    from ppma_ray.cli.validate_data import main as validate
    from ppma_ray.config import load_config
    from ppma_ray.preflight import storage_checks

    manifest, root, gone = bucket_source
    assert validate([str(manifest), "--root", root, "--out", str(tmp_path / "v"), "--backend", "pyav"]) == 1
    (reject,) = list(csv.DictReader(open(tmp_path / "v/rejects.csv")))
    assert reject["path"] == gone and reject["reason"] == "object does not exist" and reject["line"] == "8"
    assert len((tmp_path / "v/clean.csv").read_text().splitlines()) == 7
    paths = read_manifest(manifest, root=root).column("path").to_pylist()
    cfg = load_config(DEMO_CONFIG, [*TINY, f"run.storage_path={tmp_path / 'runs'}"])
    (reachable,) = [c for c in storage_checks(cfg.run.storage_path, paths) if c.name == "data reachable from workers"]
    assert not reachable.ok and f"{root}/{gone}" in reachable.detail and "8 sampled files" in reachable.detail
    (reachable,) = [c for c in storage_checks(cfg.run.storage_path, paths[:7]) if c.name == "data reachable from workers"]
    assert reachable.ok, reachable.detail


def test_with_object_storage_the_metrics_are_uploaded_next_to_the_checkpoints(s3_bucket, tmp_path):
    """``run.storage_path: s3://...``: the loggers write node-locally and upload at every checkpoint
    and at the end; a restart on another node (a fresh local folder) continues the JSON lines."""
    from ppma_ray.train.metrics import MetricsLog

    fs, folder = objectstore.filesystem(f"{s3_bucket}/runs/r-mae")
    first = MetricsLog(tmp_path / "node1", "mae", ["jsonl", "tensorboard"], "r-mae", remote=(fs, folder))
    first.write(2, {"loss": 1.0})
    first.upload()  # at a checkpoint
    with fs.open_input_stream(f"{folder}/mae_metrics.jsonl") as f:
        assert f.read().decode().splitlines() == ['{"step": 2, "loss": 1.0}']
    # the worker dies here; Ray restarts it on another node
    second = MetricsLog(tmp_path / "node2", "mae", ["jsonl", "tensorboard"], "r-mae", remote=(fs, folder))
    second.write(4, {"loss": 0.5})
    second.close()
    with fs.open_input_stream(f"{folder}/mae_metrics.jsonl") as f:
        assert [json.loads(x)["step"] for x in f.read().decode().splitlines()] == [2, 4]
    events = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{folder}/tensorboard/mae")) if i.type == pafs.FileType.File]
    assert len(events) == 2 and all("tfevents" in e for e in events)  # one file per writer, both kept


def test_a_checkpoint_uri_is_evaluated_from_a_local_copy_of_its_weights(s3_bucket, tmp_path, monkeypatch, capsys):
    """``results.json`` names checkpoints in object storage by URI; the probes and averages read
    the weights and config from a local copy (not the optimizer state), and a URI with no weights
    is named. A copy no job has used for a week is deleted, and named."""
    import os
    import tempfile
    import time

    import torch

    from ppma_ray.train.checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE, resolve_checkpoint, save_checkpoint

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # not this machine's own copies
    model = torch.nn.Linear(4, 2)
    local = save_checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-00", model, torch.optim.AdamW(model.parameters()),
                            {"step": 3}, {"model": {"depth": 2}})
    uri = upload(s3_bucket, local, f"runs/{tmp_path.name}/r-align/{local.name}")
    weights = resolve_checkpoint(uri)
    assert weights.parents[1] == tmp_path / "tmp/ppma_ray_downloads"
    assert weights.name == MODEL_FILE and weights.read_bytes() == (local / MODEL_FILE).read_bytes()
    assert (weights.parent / CONFIG_FILE).read_bytes() == (local / CONFIG_FILE).read_bytes()
    assert not (weights.parent / STATE_FILE).exists()
    assert resolve_checkpoint(uri) == weights  # downloaded once
    # the same checkpoint written again (here another size: S3 times are whole seconds): fetched again
    upload(s3_bucket, save_checkpoint(tmp_path / "again", torch.nn.Linear(4, 3), None, {"step": 4}, {}), uri.split("/", 3)[3])
    again = resolve_checkpoint(uri)
    assert again != weights and again.read_bytes() == (tmp_path / "again" / MODEL_FILE).read_bytes()
    # the first copy, unused for 8 days, goes at the next use of any copy; one used 6 days ago stays
    recent = weights.parents[1] / "recent"
    recent.mkdir()
    for copy, days in ((weights.parent, 8), (recent, 6)):
        os.utime(copy, (time.time() - days * 86400,) * 2)
    capsys.readouterr()
    assert resolve_checkpoint(uri) == again and again.is_file() and recent.is_dir()
    assert not weights.parent.exists()
    assert capsys.readouterr().err == f"removed the local copy of {uri} ({weights.parent}): unused for 8 days\n"
    with pytest.raises(FileNotFoundError, match=f"^{s3_bucket}/runs/nope: no model.safetensors there"):
        resolve_checkpoint(f"{s3_bucket}/runs/nope")


def test_resume_from_a_checkpoint_in_the_bucket_is_checked_there_and_handed_on_as_a_uri(s3_bucket, tmp_path, demo_root,
                                                                                        monkeypatch, capsys):
    """``jobs/pretrain.py --resume-from s3://...`` (results.json names checkpoints so): its stage and
    config are checked before Ray starts, from a local copy of its weights and config, and the
    workers get the URI, which they open in the bucket (``open_checkpoint``). Before, the job
    refused any URI as not a folder on this machine."""
    import contextlib
    import tempfile

    from conftest import DEMO_CONFIG, TINY

    import ppma_ray.train.runner as runner
    import ppma_ray.train.stop as stop
    from ppma_ray.cli import pretrain as job
    from ppma_ray.config import load_config, to_dict
    from ppma_ray.train.checkpoint import save_checkpoint
    from ppma_ray.train.loop import stage_model

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # not this machine's own copies
    sets = [*TINY, f"data.demo_root={demo_root}", f"run.storage_path={tmp_path / 'runs'}", "eval.tasks=[]"]
    cfg = load_config(DEMO_CONFIG, sets)
    local = save_checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-00", stage_model(cfg, "mae"), None,
                            {"step": 3, "epoch": 0}, to_dict(cfg))
    uri = upload(s3_bucket, local, f"runs/{tmp_path.name}/r-mae/{local.name}")
    started = []
    monkeypatch.setattr(job, "start_ray", lambda cfg, verbose: cfg)
    monkeypatch.setattr(stop, "graceful_stop", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(runner, "pretrain", lambda cfg, stages, resume_from, **kw: started.append((stages, resume_from)) or {})
    flags = [a for s in sets for a in ("--set", s)]
    assert job.main(["--resume-from", uri, *flags]) == 0
    assert started == [(("mae", "align"), uri)] and f"mae continues from {uri}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # checked against the bucket's config.json
        job.main(["--resume-from", uri, *flags, "--set", "mae.optim.lr=0.1"])
    assert e.value.code == 2 and f"--resume-from {uri} was trained with another config" in capsys.readouterr().err


def test_checkpoints_in_the_bucket_are_averaged_and_probed(s3_bucket, ray_session, tiny_config, tune_task, tmp_path,
                                                          monkeypatch):
    """Two stage-1 checkpoints given by URI, runs stored in the bucket: the fixed-alpha average is
    made from local copies of their weights, uploaded next to the run for the workers, and probed
    (its local copy removed afterwards); the results name the checkpoints by their URIs."""
    import tempfile

    import torch
    from safetensors.torch import load as load_safetensors

    from ppma_ray.config import to_dict
    from ppma_ray.models.averaging import average_state_dicts
    from ppma_ray.models.checkpoint import load_trunks
    from ppma_ray.train.checkpoint import save_checkpoint
    from ppma_ray.train.downstream import evaluate
    from ppma_ray.train.loop import stage_model

    runs = f"{s3_bucket}/runs/{tmp_path.name}"
    cfg = tiny_config(*tune_task, "eval.test_clips=1", "eval.test_crops=1", "eval.lp_epochs=5", f"run.storage_path={runs}",
                      "run.name=b")
    uris, local = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        local.append(save_checkpoint(tmp_path / f"m{seed}", stage_model(cfg, "mae"), None, {"step": 1}, to_dict(cfg)))
        uris.append(upload(s3_bucket, local[-1], f"runs/{tmp_path.name}/m{seed}/checkpoint_2026-01-01_00-00-00"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    entry = evaluate(cfg, "motion", "lp", "avg", uris, alphas=[0.25], cache_features=True)
    assert [p.name for p in scratch.glob("ppma_averaged_*")] == []  # the average's local copy is not left behind
    assert entry["checkpoint"] == ",".join(uris) and entry["videos"] == 12 and 0.0 <= entry["top1"] <= 1.0
    averaged = load_safetensors(objectstore.read_bytes(f"{runs}/b-avg-motion-lp/averaged/averaged.safetensors"))
    expected = average_state_dicts(load_trunks([str(d / "model.safetensors") for d in local]), [0.25, 0.75])
    assert averaged.keys() == expected.keys() and all(torch.equal(averaged[k], expected[k]) for k in expected)


def test_with_runs_in_a_bucket_the_jobs_own_files_go_to_a_local_folder_it_names(s3_bucket, tmp_path, demo_root,
                                                                                 monkeypatch, capsys):
    """``run.storage_path: s3://...`` without ``--output-dir``: ``config.json`` and ``results.json``
    used to be written under ``Path("s3://bucket/runs")``, a local folder named ``s3:`` in the working
    directory, while the job printed that path as if it were the bucket's. They go to
    ``./outputs/<run.name>`` now, and the job says so before Ray starts."""
    import contextlib

    import ppma_ray.train.runner as runner
    import ppma_ray.train.stop as stop
    from ppma_ray.cli import pretrain as job

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(job, "start_ray", lambda cfg, verbose: cfg)
    monkeypatch.setattr(stop, "graceful_stop", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(runner, "pretrain", lambda cfg, stages, **kw: {})
    sets = [*TINY, f"data.demo_root={demo_root}", f"run.storage_path={s3_bucket}/runs", "run.name=b", "eval.tasks=[]"]
    assert job.main([a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert (f"note: run.storage_path is a bucket; the job's own files (results, config) go to {tmp_path / 'outputs/b'} "
            "on this machine") in out and f"results: {tmp_path / 'outputs/b/results.json'}" in out, out
    assert sorted(p.name for p in (tmp_path / "outputs/b").iterdir()) == ["config.json", "results.json"]
    assert not (tmp_path / "s3:").exists()


def test_storage_that_cannot_be_reached_is_one_line_before_ray(s3_bucket, tmp_path, demo_root, monkeypatch, capsys):
    """``run.storage_path`` in a bucket that is not there (a typo): the job started Ray, and Ray
    Train's controller failed on it with 80 lines of traceback. The job now writes a probe object
    there first: one line naming the key, the bucket and S3's answer, exit 2, Ray never started."""
    from conftest import TINY

    from ppma_ray.cli import pretrain as job

    def no_ray(cfg, verbose):
        raise AssertionError("the job started Ray")

    monkeypatch.setattr(job, "start_ray", no_ray)
    sets = [*TINY, f"data.demo_root={demo_root}", "run.storage_path=s3://ppma-tset/runs", "eval.tasks=[]"]
    with pytest.raises(SystemExit) as exit_:
        job.main([a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: run.storage_path: s3://ppma-tset/runs cannot be written (When "), err
    assert "in bucket 'ppma-tset'" in err and "NO_SUCH_BUCKET" in err, err
