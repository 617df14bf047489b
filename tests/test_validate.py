import csv
from pathlib import Path

import pytest

from ppma_ray.data.manifest import read_manifest
from ppma_ray.data.validate import validate_manifest

GOOD = ["good0.mp4", "good1.mp4", "frames_ok", "good2.mp4"]
BAD = ["empty.mp4", "truncated.mp4", "text.mp4", "missing.mp4", "frames_gap"]


@pytest.fixture
def mixed_manifest(video_dir, tmp_path):
    names = [GOOD[0], BAD[0], GOOD[1], BAD[1], BAD[2], GOOD[2], BAD[3], BAD[4], GOOD[3]]
    f = tmp_path / "mixed.csv"
    f.write_text("".join(f"{n};{i % 3}\r\n" for i, n in enumerate(names)))
    return f


def test_validator_keeps_every_good_row_and_rejects_every_bad_one(ray_session, video_dir, mixed_manifest):
    clean, rejected = validate_manifest(read_manifest(mixed_manifest, root=video_dir))
    assert [Path(p).name for p in clean.column("path").to_pylist()] == GOOD
    assert sorted(Path(p).name for p in rejected.column("path").to_pylist()) == sorted(BAD)
    assert all(rejected.column("reason").to_pylist())
    assert min(clean.column("num_frames").to_pylist()) == 12


def test_validate_data_job_writes_clean_manifest_and_reject_list(video_dir, mixed_manifest, tmp_path, ray_session, capsys):
    from ppma_ray.cli.validate_data import main

    out = tmp_path / "out"
    code = main([str(mixed_manifest), "--root", str(video_dir), "--out", str(out)])
    assert code == 1  # rows were rejected
    assert "9 rows, 4 ok, 5 rejected" in capsys.readouterr().out
    clean = read_manifest(out / "clean.csv", root=video_dir)
    assert [Path(p).name for p in clean.column("path").to_pylist()] == GOOD
    with open(out / "rejects.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(BAD) and all(r["reason"] for r in rows)


def test_validate_data_keeps_videos_only_pyav_decodes_and_says_so(video_dir, av1_video, tmp_path, ray_session, capsys):
    """An AV1 video is clean under ``--backend auto`` (training decodes it with PyAV), and the
    summary says how many videos need PyAV and why; under ``--backend decord`` it is rejected."""
    from ppma_ray.cli.validate_data import main
    from ppma_ray.data.video import backend_problem

    if backend_problem("decord"):
        pytest.skip("without decord, auto is PyAV already")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{video_dir / 'good0.mp4'};0\n{av1_video};1\n")
    assert main([str(manifest), "--out", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert "2 rows, 2 ok, 0 rejected" in out
    assert f"decord cannot decode 1 of the ok rows; --backend auto decodes those with PyAV (in training too), e.g. line 2: {av1_video}: " \
           "decord failed on this av1 video" in out, out
    assert main([str(manifest), "--out", str(tmp_path / "decord"), "--backend", "decord"]) == 1
    assert "2 rows, 1 ok, 1 rejected" in capsys.readouterr().out
