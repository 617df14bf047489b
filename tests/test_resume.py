"""Bit-exact resume on Ray Train: after a stop, after a worker failure, and as PBT's rounds."""


import pytest
import torch
from test_train import _final_weights, _metrics

from ppma_ray.train.checkpoint import STATE_FILE
from ppma_ray.train.config import RunOptions
from ppma_ray.train.runner import resolve_paths, run_stage

pytestmark = pytest.mark.integration

SCHEDULE = "align.mix_schedule=[[1, {nohuman: 0.0, synthetic: 1.0}]]"


def test_resume_restart_and_rounds_all_reach_the_uninterrupted_weights(ray_session, tiny_config, tmp_path):
    """One stage-2 run with a mix schedule, reached three ways, bit for bit:
    (a) uninterrupted;
    (b) stopped after step 5, mid-epoch (as a crash would), then the same command again, during
        which a worker raises once at step 9 and Ray restarts it from the last checkpoint (step 8);
    (c) PBT's round trip: another run name continues the full state of (b)'s epoch-1 checkpoint."""
    common = ["align.epochs=2", "align.batch_size=8", "align.samples_per_epoch=48", "run.checkpoint_every=2",
              "run.keep=10", "align.mix={nohuman: 0.5, synthetic: 0.5}", SCHEDULE,
              "align.random_erase=0.5"]  # its boxes come from Python's random: reseeded per step too
    reference = run_stage(resolve_paths(tiny_config(*common, "run.name=ref")), RunOptions("align"))
    assert reference["steps"] == 12

    first = run_stage(resolve_paths(tiny_config(*common, "run.name=resumed", "run.max_steps=5")), RunOptions("align"))
    assert first["steps"] == 5
    resumed = run_stage(resolve_paths(tiny_config(*common, "run.name=resumed", "run.fail_at_step=9",
                                                  "run.max_failures=1")), RunOptions("align"))
    assert resumed["steps"] == 12 and (tmp_path / "runs/resumed-align/failed_at_9").exists()
    lines = [m for m in _metrics(tmp_path / "runs/resumed-align", "align") if "loss" in m]
    assert [m["step"] for m in lines] == [2, 4, 6, 8, 10, 12]  # no step repeated or skipped
    ref_lr = {m["step"]: m["lr"] for m in _metrics(tmp_path / "runs/ref-align", "align") if "lr" in m}
    assert all(m["lr"] == pytest.approx(ref_lr[m["step"]]) for m in lines)

    epoch1 = next(d for d in (tmp_path / "runs/resumed-align").glob("checkpoint_*")
                  if torch.load(d / STATE_FILE, weights_only=True)["step"] == 6)
    round2 = run_stage(resolve_paths(tiny_config(*common, "run.name=r2")), RunOptions("align", resume_from=str(epoch1)))
    assert round2["steps"] == 12
    assert [m["step"] for m in _metrics(tmp_path / "runs/r2-align", "align")][0] > 6  # continued, not restarted

    ref_w = _final_weights(reference)
    for other in (resumed, round2):
        weights = _final_weights(other)
        assert all(torch.equal(ref_w[k], weights[k]) for k in ref_w)
