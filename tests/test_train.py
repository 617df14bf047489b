"""Ray Train end to end on the demo data (tiny models, CPU, gloo): both stages under two-worker DDP."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppma_ray.train.checkpoint import STATE_FILE
from ppma_ray.train.runner import pretrain

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
