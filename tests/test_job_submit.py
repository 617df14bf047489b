"""`ray job submit` of the main job against a real head node started (and stopped) by the test."""

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import agent_ports, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def head_node():
    """A separate single-node cluster. Its processes are found by its own temp dir on teardown,
    because `ray stop` would also stop the test session's local instance."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash = free_port(), free_port()
    # token authentication with a token of the test's own: a fresh machine has no ~/.ray/auth_token
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
         f"--dashboard-port={dash}", "--include-dashboard=true", f"--temp-dir={temp}", "--block", *agent_ports()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(address, timeout=2)
            break
        except Exception:
            time.sleep(1)
    else:
        pytest.fail("the head node's dashboard did not come up")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(2)
    subprocess.run(["pkill", "-9", "-f", temp], check=False)  # the daemons it started, by their paths


def test_ray_job_submit_runs_pretrain(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "out"
    tiny = ["model.depth=2", "model.decoder_depth=1", "data.clip.img_size=32", "data.clip.short_side=36",
            "data.clip.num_frames=8", "scaling.cpus_per_worker=0.5", "mae.epochs=1", "align.epochs=1",
            f"run.storage_path={tmp_path / 'runs'}", f"data.demo_root={tmp_path / 'demo'}", "run.name=job"]
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--", "python", "jobs/pretrain.py", "--stage", "mae", *[a for t in tiny for a in ("--set", t)],
           "--output-dir", str(out)]
    for _ in range(30):  # the dashboard answers before its job agent is ready
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in r.stderr + r.stdout:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["mae"]["steps"] == 6 and Path(results["stages"]["mae"]["checkpoint"]).is_dir()
