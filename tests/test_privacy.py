"""Human removal: inpainting quality on a known background, the full job, the torchvision wiring."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ppma_ray.data.video import sample_clip, write_video
from ppma_ray.privacy.inpaint import inpaint_video, person_mask
from ppma_ray.privacy.segment import ColorKeySegmenter

MAGENTA = (255, 0, 255)


def scene(t_len=24, h=64, w=96, pan=0.0, seed=0):
    """A smooth textured background (optionally panning) and a magenta 'person' sprite walking across.
    Returns (frames with the sprite, the true background frames, the sprite mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w + 40].astype(np.float64)
    big = np.stack([120 + 60 * np.sin(xx / 9 + c) * np.cos(yy / 11 - c) for c in range(3)], -1)
    big += rng.normal(0, 2, big.shape)
    big = np.clip(big, 0, 255).astype(np.uint8)
    bg = np.stack([big[:, int(round(pan * t)):int(round(pan * t)) + w] for t in range(t_len)])
    frames, mask = bg.copy(), np.zeros(bg.shape[:3], dtype=bool)
    for t in range(t_len):
        x = 8 + 3 * t
        mask[t, 18:50, x:x + 10] = True
        frames[t][mask[t]] = MAGENTA
    return frames, bg, mask


@pytest.mark.parametrize("pan", [0.0, 1.0])
def test_inpainting_restores_the_known_background_and_leaves_the_rest_untouched(pan):
    frames, bg, truth = scene(pan=pan)
    mask = person_mask(ColorKeySegmenter(MAGENTA)(frames), dilate_iters=4)
    assert mask[truth].all()  # the dilated mask covers the sprite
    out = inpaint_video(frames, mask)
    assert np.array_equal(out[~mask], frames[~mask])  # outside the mask: bit-identical
    # inside the mask (border columns excepted when panning: they enter the view only later)
    inner = mask.copy()
    inner[:, :, :4] = inner[:, :, -4:] = False
    err = np.abs(out[inner].astype(float) - bg[inner].astype(float)).mean()
    assert err < 4.0, err  # mean absolute error in 8-bit grey levels
    assert not (np.abs(out.astype(int) - MAGENTA).max(-1) < 60).any()  # no sprite pixel left


@pytest.fixture
def clips_with_people(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(2):
        frames, _, _ = scene(t_len=16, seed=i)
        write_video(root / f"walk{i}.mp4", frames, fps=25, crf=12)
    (root / "broken.mp4").write_text("not a video")
    (root / "list.csv").write_text("walk0.mp4;3\r\nbroken.mp4;1\r\nwalk1.mp4;4")
    return root


def test_remove_humans_says_which_videos_pyav_decoded(av1_video, tmp_path, ray_session, capsys):
    """An AV1 input (decord cannot open it) is decoded with PyAV under ``auto``: the No-Human
    video is written, and the console and report.csv say that PyAV decoded it, and why."""
    from ppma_ray.cli.remove_humans import main
    from ppma_ray.data.video import backend_problem

    if backend_problem("decord"):
        pytest.skip("without decord, auto is PyAV already")
    (tmp_path / "list.csv").write_text(f"{av1_video};2\n")
    out = tmp_path / "nohuman"
    assert main([str(tmp_path / "list.csv"), "--out", str(out), "--segmenter", "colorkey:255,0,255"]) == 0
    stdout = capsys.readouterr().out
    assert "1 of 1 videos written" in stdout
    assert f"decord could not decode 1 of the videos; PyAV decoded them (report.csv, pyav_fallback), e.g. line 1: {av1_video}: " \
           "decord failed on this av1 video" in stdout, stdout
    with open(out / "report.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["out_path"] == "av1.mp4" and row["pyav_fallback"].startswith("decord failed on this av1 video")
    assert sample_clip(out / "av1.mp4", num_frames=4, seed=0).shape == (4, 64, 80, 3)


def test_remove_humans_job_writes_videos_manifest_and_report(clips_with_people, tmp_path, ray_session, capsys):
    from ppma_ray.cli.remove_humans import main

    out = tmp_path / "nohuman"
    code = main([str(clips_with_people / "list.csv"), "--root", str(clips_with_people), "--out", str(out),
                 "--segmenter", "colorkey:255,0,255"])
    stdout = capsys.readouterr().out
    assert code == 1, stdout  # one input was broken
    assert "2 of 3 videos written" in stdout and "broken.mp4" in stdout
    assert (out / "manifest.csv").read_text().splitlines() == ["walk0.mp4;3", "walk1.mp4;4"]
    with open(out / "report.csv") as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    assert rows["broken.mp4"]["error"] and not rows["walk0.mp4"]["error"]
    assert not any(r["pyav_fallback"] for r in rows.values()) and "PyAV decoded" not in stdout  # H.264: decord's
    assert float(rows["walk0.mp4"]["person_frac_before"]) > 0.03 and float(rows["walk0.mp4"]["person_frac_after"]) == 0.0
    clip = sample_clip(out / "walk0.mp4", num_frames=16, clip_seconds=1.0, seed=0)
    assert clip.shape == (16, 64, 96, 3)
    assert (np.abs(clip.astype(int) - MAGENTA).max(-1) < 60).mean() < 1e-3  # the person is gone
    assert json.loads((out / "removal.json").read_text())["segmenter"] == "colorkey:255,0,255"

    # the audit reads removal.json: the same model would only confirm its own output
    from ppma_ray.cli.audit_privacy import main as audit_main

    args = [str(out / "manifest.csv"), "--root", str(out), "--segmenter", "colorkey:255,0,255", "--frames-per-video", "4",
            "--out", str(tmp_path / "audit.csv")]
    with pytest.raises(SystemExit) as exit_:
        audit_main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "removed by colorkey:255,0,255" in err, err
    assert audit_main([*args, "--allow-same-family"]) == 0
    stdout = capsys.readouterr().out
    assert "verdict: clean: 0 of 8 sampled frames show a person (NOT independent: the removal's own model family)" in stdout
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary["removed_by"] == summary["audited_by"] == "colorkey:255,0,255" and not summary["independent"]


def test_an_interrupted_removal_continues_where_it_stopped(clips_with_people, tmp_path, ray_session, capsys):
    """The real faults of a long removal: a video cut off mid-write (a truncated ``.part`` file, no
    record) and one whose finished mp4 was lost. The re-run redoes exactly those, keeps the rest
    (their mp4s untouched), and reports every video; other settings into the same folder are refused."""
    from ppma_ray.cli.remove_humans import main

    out = tmp_path / "nohuman"
    args = [str(clips_with_people / "list.csv"), "--root", str(clips_with_people), "--out", str(out),
            "--segmenter", "colorkey:255,0,255"]
    assert main(args) == 1  # broken.mp4
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    assert sorted(first) == ["walk0.mp4", "walk1.mp4"] and sorted(p.name for p in (out / ".done").iterdir()) == [
        "walk0.mp4.json", "walk1.mp4.json"]
    (out / "walk1.mp4").rename(out / ".walk1.part.mp4")  # killed while writing walk1: a torn part file
    with open(out / ".walk1.part.mp4", "r+b") as f:
        f.truncate(1000)
    (out / ".done" / "walk1.mp4.json").unlink()
    (out / "manifest.csv").unlink()
    capsys.readouterr()
    assert main(args) == 1
    stdout = capsys.readouterr().out
    assert "1 of 3 videos were finished by an earlier run" in stdout and "2 of 3 videos written" in stdout, stdout
    assert (out / "walk0.mp4").stat().st_mtime_ns == first["walk0.mp4"]  # kept
    assert sample_clip(out / "walk1.mp4", num_frames=16, clip_seconds=1.0, seed=0).shape == (16, 64, 96, 3)  # redone
    assert (out / "manifest.csv").read_text().splitlines() == ["walk0.mp4;3", "walk1.mp4;4"]
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["walk0.mp4", "broken.mp4", "walk1.mp4"]  # manifest order
    assert float(rows[0]["person_frac_before"]) > 0.03  # the kept video's row, from its record

    with pytest.raises(SystemExit) as exit_:
        main([*args, "--threshold", "0.6"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "made with other settings (threshold 0.5 -> 0.6)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("lines, root, words", [
    ("a/clip.mp4;1\nb/clip.mp4;2", False, "lines 1 and 2: both videos would be written to"),  # no --root: names clash
    ("walk.avi;1\nwalk.mp4;2", True, "lines 1 and 2: both videos would be written to"),  # both become walk.mp4
    ("walk.mp4;1", "out", "would be overwritten by its own output"),  # --out is the videos' folder
])
def test_a_removal_that_would_lose_or_damage_videos_is_refused_before_ray(tmp_path, capsys, lines, root, words):
    from ppma_ray.cli.remove_humans import main

    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "list.csv").write_text(lines)
    out = tmp_path / "v" if root == "out" else tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "v" / "list.csv"), *(["--root", str(tmp_path / "v")] if root else []), "--out", str(out),
              "--segmenter", "colorkey:255,0,255"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and words in err and len(err.splitlines()) == 1, err


def test_a_removal_into_an_output_folder_another_removal_writes_is_refused_before_ray(tmp_path, capsys):
    """Two removals into one --out would write the same .part files and records at once."""
    from conftest import hold_lock

    from ppma_ray.cli.remove_humans import main

    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "list.csv").write_text("walk.mp4;1")
    out = tmp_path / "out"
    with hold_lock(out / ".removal.lock") as holder, pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "v" / "list.csv"), "--root", str(tmp_path / "v"), "--out", str(out),
              "--segmenter", "colorkey:255,0,255"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --out {out} is in use by another run (pid {holder.pid} on "), err
    assert err.endswith(": wait for it to finish, or use another --out"), err


@pytest.mark.parametrize("removed_by, requested, expected", [
    ("torchvision", "auto", ("maskrcnn", True)),
    ("torchvision:deeplabv3_resnet50:/w/seg.pth", "auto", ("maskrcnn", True)),
    ("maskrcnn:none", "auto", ("torchvision", True)),
    (None, "auto", ("maskrcnn", False)),  # nothing recorded: run, but do not call it independent
    ("torchvision", "torchvision:deeplabv3_resnet101", "same family"),
    ("colorkey:255,0,255", "maskrcnn", ("maskrcnn", True)),
])
def test_the_audit_uses_another_model_family_than_the_removal(removed_by, requested, expected):
    from ppma_ray.cli.audit_privacy import pick_auditor
    from ppma_ray.config import ConfigError

    if expected == "same family":
        with pytest.raises(ConfigError, match="same family .DeepLabV3"):
            pick_auditor(requested, removed_by)
        assert pick_auditor(requested, removed_by, allow_same_family=True) == (requested, False)
    else:
        assert pick_auditor(requested, removed_by) == expected


def test_mask_rcnn_detector_builds_without_weights_runs_and_loads_whole(tmp_path):
    """The audit's default model family: frames in, a person map out; a weights file loads whole
    or is refused, as for the segmenter."""
    import torch

    from ppma_ray.privacy.job import make_segmenter
    from ppma_ray.privacy.segment import TorchvisionDetector

    seg = make_segmenter("maskrcnn:none")
    assert isinstance(seg, TorchvisionDetector) and seg.model.roi_heads.mask_predictor is not None
    seg.model.transform.min_size, seg.model.transform.max_size = (64,), 96  # a small input for the test
    seg.min_score = 0.0  # an untrained model's detections score low: keep them, to exercise the masks
    seg.model.roi_heads.detections_per_img = 5  # of 100: pasting each mask is most of the CPU time
    frames, _, _ = scene(t_len=2)
    prob = seg(frames)
    assert prob.shape == (2, 64, 96) and prob.dtype == np.float32 and ((prob >= 0) & (prob <= 1)).all()
    state = seg.model.state_dict()
    torch.save({k: v for k, v in state.items() if k != "roi_heads.mask_predictor.mask_fcn_logits.weight"},
               tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken.pth is not a maskrcnn_resnet50_fpn_v2 person detector: missing "
                                         r"\['roi_heads.mask_predictor.mask_fcn_logits.weight'\]"):
        TorchvisionDetector(weights_path=str(tmp_path / "broken.pth"), device="cpu")


def test_torchvision_segmenter_builds_without_weights_and_runs():
    from ppma_ray.privacy.job import make_segmenter

    seg = make_segmenter("torchvision:none")
    frames, _, _ = scene(t_len=3)
    prob = seg(frames)
    assert prob.shape == (3, 64, 96) and prob.dtype == np.float32 and ((prob >= 0) & (prob <= 1)).all()


def test_segmenter_weights_load_whole_or_not_at_all(tmp_path):
    """A user's segmenter file as torchvision trains it (with the auxiliary head) loads and gives the
    same person map; a file that does not fit is refused, never half-loaded."""
    import torch
    from torchvision.models import get_model

    from ppma_ray.privacy.segment import TorchvisionSegmenter

    torch.manual_seed(0)
    trained = get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    torch.save(trained.state_dict(), tmp_path / "seg.pth")
    seg = TorchvisionSegmenter(weights_path=str(tmp_path / "seg.pth"), device="cpu")
    main = {k: v for k, v in trained.state_dict().items() if not k.startswith("aux_classifier.")}
    loaded = seg.model.state_dict()
    assert loaded.keys() == main.keys() and all(torch.equal(loaded[k], main[k]) for k in main)
    frames, _, _ = scene(t_len=2)
    assert seg(frames).shape == frames.shape[:3]
    broken = {k: v for k, v in trained.state_dict().items() if k != "classifier.4.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken.pth is not a deeplabv3_mobilenet_v3_large person segmenter: "
                                         r"missing \['classifier.4.weight'\]"):
        TorchvisionSegmenter(weights_path=str(tmp_path / "broken.pth"), device="cpu")


def test_named_segmenter_weights_are_found_or_refused_before_ray(tmp_path, monkeypatch):
    """The torchvision weights a spec names are looked up in this machine's torch hub cache before Ray
    starts; missing and not downloadable (offline: the download raises as urllib does), the job stops
    with a line saying where the file goes, instead of a traceback from every actor. Nothing is
    downloaded here: the download function is replaced."""
    import urllib.error

    import torch

    from ppma_ray.config import ConfigError
    from ppma_ray.privacy.job import fetch_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, **kw):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert fetch_weights("torchvision:none") is None and fetch_weights("colorkey:255,0,255") is None
    file = "deeplabv3_mobilenet_v3_large-fc3c493d.pth"  # torchvision's DEFAULT for the default arch
    with pytest.raises(ConfigError, match=rf"^--segmenter torchvision: deeplabv3_mobilenet_v3_large's DEFAULT weights are "
                                          rf"not in the torch hub cache \({tmp_path}/hub/checkpoints/{file}\) and could not be "
                                          rf"downloaded \(URLError: .*Name or service not known.*\): put {file} there"):
        fetch_weights("torchvision")
    with pytest.raises(ConfigError, match=r"'deeplabv3_resnet5' is neither a weights file nor weights of "
                                          r"deeplabv3_mobilenet_v3_large \(COCO_WITH_VOC_LABELS_V1, DEFAULT\)"):
        fetch_weights("torchvision:deeplabv3_resnet5")  # a typo in the arch
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / file).write_bytes(b"cached")  # pre-populated, as on a cluster without internet
    assert fetch_weights("torchvision:deeplabv3_mobilenet_v3_large:DEFAULT") == tmp_path / "hub" / "checkpoints" / file


def test_audit_reports_people_before_and_none_after(clips_with_people, tmp_path, ray_session):
    from ppma_ray.data.manifest import read_manifest
    from ppma_ray.privacy.job import audit, remove_humans

    table = read_manifest(clips_with_people / "list.csv", root=clips_with_people)
    before = audit(table, "colorkey:255,0,255", frames_per_video=4).to_pylist()
    assert [r["frames_with_person"] for r in before if not r["error"]] == [4, 4]
    remove_humans(table, tmp_path / "clean", str(clips_with_people), "colorkey:255,0,255")
    after = audit(read_manifest_rows(tmp_path / "clean"), "colorkey:255,0,255", frames_per_video=4).to_pylist()
    assert all(r["frames_with_person"] == 0 for r in after)


def read_manifest_rows(folder):
    import pyarrow as pa

    paths = sorted(str(p) for p in folder.glob("*.mp4"))
    return pa.table({"path": paths, "label": [0] * len(paths), "line": list(range(1, len(paths) + 1))})
