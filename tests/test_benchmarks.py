"""The prepared GPU check runs end to end in its CPU dry-run mode, so it is known to work before
anyone spends GPU time on it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def test_gpu_check_dry_run_writes_every_figure(tmp_path, ray_session):
    # it joins the session's Ray instance, as it would join a cluster's (starting one locally is
    # what the session fixture itself does, through the same ``init_ray``)
    env = {**os.environ, "PYTHON": sys.executable, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    out, videos = tmp_path / "out", tmp_path / "videos"
    r = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--profile", "--more-batches", "2",
                        "--videos", str(videos), "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and set(report["step"]) == {"mae", "align", "mae_b2", "align_b2"} and "errors" not in report
    assert all(s["clips_per_s"] > 0 and s["last_step_taken"] for s in report["step"].values())
    assert report["step"]["mae_b2"]["batch"] == 2
    assert "aten::" in (out / "profile_mae.txt").read_text() and "aten::" in (out / "profile_align.txt").read_text()
    assert report["feed"]["clips_per_s"] > 0 and report["feed"]["clips"] == 8 * 4  # every video, k = 4
    under = report["step_under_feed"]  # the step while another process keeps the feed busy
    assert under["clips_per_s"] > 0 and under["last_step_taken"] and under["over_alone"] > 0
    assert under["feed"]["clips_per_s"] > 0 and under["feed"]["cpus"] >= 1
    pre = report["pretrain"]
    assert pre["returncode"] == 0 and pre["steps"] == 4 and pre["log_every"] == 1
    assert 0.0 <= pre["data_wait_frac"] <= 1.0 and [line[0] for line in pre["by_line"]] == [1, 2, 3, 4]
    assert pre["mean_from_step"] == 2
    assert pre["checkpoints"] == 1  # one epoch: its checkpoint at the end, none every two steps
    assert (videos / "train.csv").is_file()  # written on the first run, read by the next (--videos)
