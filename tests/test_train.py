"""Ray Train end to end on the demo data (tiny models, CPU, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppma_ray.config import load_config
from ppma_ray.train.checkpoint import STATE_FILE
from ppma_ray.train.runner import pretrain, run_stage, resolve_paths

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.depth=2", "model.decoder_depth=1", "model.decoder_embed_dim=64", "model.decoder_num_heads=2",
    "data.clip.num_frames=8", "data.clip.clip_seconds=0.64", "data.clip.img_size=32", "data.clip.short_side=36",
    "scaling.cpus_per_worker=0.25", "scaling.torch_threads=1", "run.log_every=2",
]


def tiny_config(tmp_path, *extra):
    overrides = TINY + [f"run.storage_path={tmp_path / 'runs'}", f"data.demo_root={tmp_path.parent / 'demo'}", *extra]
    return load_config(ROOT / "jobs/configs/demo.yaml", overrides)


def _metrics(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"{stage}_metrics.jsonl").read_text().splitlines()]


def test_two_worker_ddp_pretraining_end_to_end(ray_session, tmp_path):
    cfg = tiny_config(
        tmp_path, "scaling.num_workers=2", "run.name=e2e", "mae.epochs=3", "mae.batch_size=16",
        "align.epochs=3", "align.batch_size=16", "align.optim.lr=2e-3",
    )
    out = pretrain(cfg)
    mae = _metrics(tmp_path / "runs/e2e-mae", "mae")
    assert mae[-1]["loss"] < mae[0]["loss"]
    assert out["mae"]["steps"] == 3 * (192 // 4 // 4)  # 192 clips/epoch = 48 videos x 4 replicas
    # scene classes of the no-human set are easy; 6 classes, so chance is 1/6
    assert out["align"]["val_top1"]["nohuman"] > 0.5
    for stage in ("mae", "align"):
        ckpt = Path(out[stage]["checkpoint"])
        assert {"model.safetensors", "train_state.pt", "config.json"} <= {p.name for p in ckpt.iterdir()}
        state = torch.load(ckpt / STATE_FILE, weights_only=True)
        assert state["step"] == out[stage]["steps"] and "optimizer" in state
        assert load_file(str(ckpt / "model.safetensors"))


def _final_weights(result: dict) -> dict:
    return load_file(str(Path(result["checkpoint"]) / "model.safetensors"))


def test_resume_and_worker_failure_reach_the_uninterrupted_weights(ray_session, tmp_path):
    common = ["mae.epochs=2", "mae.batch_size=8", "mae.samples_per_epoch=48", "run.checkpoint_every=2", "run.keep=10"]
    reference = run_stage(resolve_paths(tiny_config(tmp_path, *common, "run.name=ref")), "mae")
    assert reference["steps"] == 12

    # stopped after step 5 (as a crash would), then the same command again, during which a worker
    # raises once at step 7 and Ray restarts it from the last checkpoint (step 6)
    first = run_stage(resolve_paths(tiny_config(tmp_path, *common, "run.name=resumed", "run.max_steps=5")), "mae")
    assert first["steps"] == 5
    resumed = run_stage(resolve_paths(tiny_config(tmp_path, *common, "run.name=resumed", "run.fail_at_step=7",
                                                  "run.max_failures=1")), "mae")
    assert resumed["steps"] == 12 and (tmp_path / "runs/resumed-mae/failed_at_7").exists()
    lines = _metrics(tmp_path / "runs/resumed-mae", "mae")
    assert [m["step"] for m in lines] == [2, 4, 6, 8, 10, 12]  # no step repeated or skipped
    ref_lines = {m["step"]: m["lr"] for m in _metrics(tmp_path / "runs/ref-mae", "mae")}
    assert all(m["lr"] == pytest.approx(ref_lines[m["step"]]) for m in lines)
    ref_w, res_w = _final_weights(reference), _final_weights(resumed)
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)


SCHEDULE = "align.mix_schedule=[[1, {nohuman: 0.0, synthetic: 1.0}]]"


def test_mix_schedule_sets_each_epochs_sources(tmp_path):
    from ppma_ray.train.data import EpochStream, clip_config, decode_resources, resolve_sources

    cfg = resolve_paths(tiny_config(tmp_path, "align.mix={nohuman: 1.0, synthetic: 0.0}", SCHEDULE))
    sources = [r.train for r in resolve_sources(cfg.data, cfg.align.source_names())]
    stream = EpochStream(sources, cfg.align, clip_config(cfg.data, 1), decode_resources(cfg.data, 1.0), 0, 1, 0)
    assert stream.steps_per_epoch * 32 == sum(s.table.num_rows for s in sources)  # both sources are trained on
    assert set(stream.rank_table(0).column("source").to_pylist()) == {0}  # nohuman only
    assert set(stream.rank_table(1).column("source").to_pylist()) == {1}  # synthetic only


def test_a_stage_run_in_rounds_equals_the_uninterrupted_run(ray_session, tmp_path):
    """PBT's round trip: stop after epoch 1, continue the full state under another run name with
    the schedule extended, and reach exactly the weights of one run with that schedule."""
    common = ["align.epochs=2", "align.batch_size=8", "align.samples_per_epoch=48",
              "align.mix={nohuman: 0.5, synthetic: 0.5}"]
    reference = run_stage(resolve_paths(tiny_config(tmp_path, *common, SCHEDULE, "run.name=ref")), "align")
    first = run_stage(resolve_paths(tiny_config(tmp_path, *common, "run.name=r1")), "align", stop_epoch=1)
    assert first["steps"] == 6
    second = run_stage(resolve_paths(tiny_config(tmp_path, *common, SCHEDULE, "run.name=r2")), "align",
                       resume_from=first["checkpoint"])
    assert second["steps"] == reference["steps"] == 12
    assert [m["step"] for m in _metrics(tmp_path / "runs/r2-align", "align")][0] > 6  # continued, not restarted
    ref_w, res_w = _final_weights(reference), _final_weights(second)
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--set", "mae.epoch=3"], "mae.epoch: unknown key"),
        (["--set", "mae.batch_size=big"], "mae.batch_size: expected an integer"),
        (["--set", "data.sources.nohuman.manifest=/nope/train.csv"], "data.sources.nohuman.manifest: /nope/train.csv does not exist"),
        (["--set", "align.mix.people=1"], "align.mix.people: no such source"),
        (["--set", "align.mix_schedule=[[2, {synthetic: 1.0}], [1, {nohuman: 1.0}]]"], "start epochs must be >= 0 and increasing"),
        (["--config", "/nope.yaml"], "/nope.yaml: config file does not exist"),
    ],
)
def test_config_errors_are_one_clear_line_and_nonzero(args, words):
    r = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain.py"), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
