"""Ray Train end to end on the demo data (tiny models, CPU, gloo): DDP, bit-exact resume after a
stop and a worker failure, a stage run in rounds."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppma_ray.train.checkpoint import STATE_FILE
from ppma_ray.train.loop import RunOptions
from ppma_ray.train.runner import pretrain, resolve_paths, run_stage

pytestmark = pytest.mark.integration


def _metrics(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"{stage}_metrics.jsonl").read_text().splitlines()]


def _final_weights(result: dict) -> dict:
    return load_file(str(Path(result["checkpoint"]) / "model.safetensors"))


def test_two_worker_ddp_pretraining_end_to_end(ray_session, tiny_config, tmp_path):
    cfg = tiny_config("scaling.num_workers=2", "run.name=e2e", "mae.epochs=3", "mae.batch_size=16",
                      "mae.samples_per_epoch=128", "align.epochs=3", "align.batch_size=16", "align.samples_per_epoch=192",
                      "align.optim.lr=2e-3", "run.val_every=3")
    out = pretrain(cfg)
    mae = _metrics(tmp_path / "runs/e2e-mae", "mae")
    assert mae[-1]["loss"] < mae[0]["loss"]
    assert out["mae"]["steps"] == 3 * (128 // 16)
    # scene classes of the no-human set are easy; 6 classes, so chance is 1/6
    assert out["align"]["val_top1"]["nohuman"] > 0.5
    for stage in ("mae", "align"):
        ckpt = Path(out[stage]["checkpoint"])
        assert {"model.safetensors", "train_state.pt", "config.json"} <= {p.name for p in ckpt.iterdir()}
        state = torch.load(ckpt / STATE_FILE, weights_only=True)
        assert state["step"] == out[stage]["steps"] and "optimizer" in state
        assert load_file(str(ckpt / "model.safetensors"))


SCHEDULE = "align.mix_schedule=[[1, {nohuman: 0.0, synthetic: 1.0}]]"


def test_resume_restart_and_rounds_all_reach_the_uninterrupted_weights(ray_session, tiny_config, tmp_path):
    """One stage-2 run with a mix schedule, reached three ways, bit for bit:
    (a) uninterrupted;
    (b) stopped after step 5, mid-epoch (as a crash would), then the same command again, during
        which a worker raises once at step 9 and Ray restarts it from the last checkpoint (step 8);
    (c) PBT's round trip: another run name continues the full state of (b)'s epoch-1 checkpoint."""
    common = ["align.epochs=2", "align.batch_size=8", "align.samples_per_epoch=48", "run.checkpoint_every=2",
              "run.keep=10", "align.mix={nohuman: 0.5, synthetic: 0.5}", SCHEDULE]
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
