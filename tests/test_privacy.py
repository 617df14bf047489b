"""Human removal: inpainting quality on a known background, the full job, the torchvision wiring."""

import csv
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
    assert float(rows["walk0.mp4"]["person_frac_before"]) > 0.03 and float(rows["walk0.mp4"]["person_frac_after"]) == 0.0
    clip = sample_clip(out / "walk0.mp4", num_frames=16, clip_seconds=1.0, seed=0)
    assert clip.shape == (16, 64, 96, 3)
    assert (np.abs(clip.astype(int) - MAGENTA).max(-1) < 60).mean() < 1e-3  # the person is gone


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
