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
    r = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and set(report["step"]) == {"mae", "align"}
    assert all(s["clips_per_s"] > 0 and s["last_step_taken"] for s in report["step"].values())
    assert report["feed"]["clips_per_s"] > 0 and report["feed"]["clips"] == 8 * 4  # every video, k = 4
    assert report["pretrain"]["returncode"] == 0 and report["pretrain"]["steps"] == 4
    assert 0.0 <= report["pretrain"]["data_wait_frac"] <= 1.0
