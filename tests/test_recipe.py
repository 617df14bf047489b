"""The released recipe, reproducible: layer-decay multipliers of both styles, pytorchvideo's
RandAugment semantics, erasing before Mixup/CutMix, a size-proportional stage mix, and the paper
config's downstream sections."""

import math

import numpy as np

import pytest
import torch

from conftest import ROOT

from ppma_ray.config import OptimConfig, load_config
from ppma_ray.data.randaug import OPS, VideoRandAugment, apply_op
from ppma_ray.models import create_model
from ppma_ray.train.optim import build_optimizer

SMALL = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2)


def _exponents(style: str) -> dict[str, float]:
    """log_0.75 of each parameter group's LR multiplier, by module."""
    model = create_model("vit_tiny", "classifier", num_classes=5, depth=12, **SMALL)
    opt = build_optimizer(model, OptimConfig(layer_decay=0.75, layer_decay_style=style))
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            parts = names[id(p)].split(".")
            out[".".join(parts[:2]) if parts[0] == "blocks" else parts[0]] = round(math.log(g["lr_scale"]) / math.log(0.75), 6)
    return out


def test_layer_decay_multipliers_of_both_styles():
    timm = _exponents("timm")  # BEiT / VideoMAE / timm: the head at 1.0
    assert timm["patch_embed"] == 13 and timm["heads"] == timm["fc_norm"] == 0
    assert [timm[f"blocks.{k}"] for k in range(12)] == [12 - k for k in range(12)]
    release = _exponents("release")  # the released code: patch 0.75^14, block k 0.75^(13-k), head 0.75
    assert release["patch_embed"] == 14 and release["heads"] == release["fc_norm"] == 1
    assert [release[f"blocks.{k}"] for k in range(12)] == [13 - k for k in range(12)]


def test_randaugment_applies_each_op_with_probability_one_half_at_a_jittered_0_to_10_magnitude():
    torch.manual_seed(0)
    ra = VideoRandAugment(magnitude=7, num_layers=4, prob=0.5)
    draws = [ra.sample() for _ in range(4000)]
    applied = sum(len(d) for d in draws) / (4 * len(draws))
    assert abs(applied - 0.5) < 0.02  # each op on its own (torchvision's block: all 4 or none)
    assert 0.04 < sum(len(d) == 0 for d in draws) / len(draws) < 0.09  # 0.5^4 = 0.0625
    assert all(len({name for name, _ in d}) == len(d) for d in draws)  # 4 distinct ops per clip
    assert {name for d in draws for name, _ in d} == set(OPS)
    rotations = [arg for d in draws for name, arg in d if name == "Rotate"]
    degrees = torch.tensor([abs(a) for a in rotations])
    assert abs(degrees.mean().item() - 21.0) < 0.5  # 7/10 of 30 degrees, jitter std 0.5 level = 1.5 degrees
    assert 1.0 < degrees.std().item() < 2.0
    assert 0.4 < sum(a < 0 for a in rotations) / len(rotations) < 0.6  # signed ops flip half the time
    posterize = {arg for d in draws for name, arg in d if name == "Posterize"}
    assert posterize <= {2, 1}  # 4 - int(level / 10 * 4): 2 bits at levels 5-7.5, 1 above


def test_randaugment_uses_one_draw_for_every_frame_of_a_clip():
    torch.manual_seed(1)
    clip = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    ra = VideoRandAugment(magnitude=9, num_layers=4, prob=1.0)
    for _ in range(20):
        ops = ra.sample()
        whole = ra.apply(clip, ops)
        one_by_one = torch.stack([ra.apply(frame[None], ops)[0] for frame in clip])
        assert torch.equal(whole, one_by_one), ops
    # geometric ops fill with gray, as the release's 0.5
    shifted = apply_op(torch.zeros(1, 3, 20, 20, dtype=torch.uint8), "TranslateX", 0.45)
    assert shifted[..., -1].float().mean() == 128


def test_random_erasing_happens_before_mixup_as_released():
    from ppma_ray.train.stages import AlignLoss

    calls = []
    loss = AlignLoss(["a"], {"a": 3}, mixup_alpha=0.8, random_erase=1.0)
    erase, mix = loss.erase, loss.mix["a"]
    loss.erase = lambda x: (calls.append("erase"), erase(x))[1]
    loss.mix["a"] = lambda *a: (calls.append("mix"), mix(*a))[1]
    model = create_model("vit_tiny", "classifier", num_classes={"a": 3}, depth=1, **SMALL)
    batch = {"video": torch.randint(0, 256, (4, 4, 32, 32, 3), dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 0]),
             "source": torch.zeros(4, dtype=torch.long)}
    loss(model, batch)
    assert calls == ["erase", "mix"]


def test_size_proportional_mix_passes_over_each_source_once_per_epoch(tmp_path, demo_root):
    from ppma_ray.train.data import EpochStream, resolve_sources

    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [f"data.demo_root={demo_root}", "align.mix_by=sizes",
                                                         "align.mix={nohuman: 0.9, synthetic: 0.1}", "align.batch_size=16"])
    sources = [s.train for s in resolve_sources(cfg.data, ["nohuman", "synthetic"])]
    stream = EpochStream(sources, cfg.align, cfg.data.clip, cfg.data.decode, seed=0, world=1, rank=0)
    index = stream.rank_table(0).column("source").to_pylist()
    counts = {s.name: index.count(k) for k, s in enumerate(sources)}
    sizes = {s.name: s.table.num_rows for s in sources}
    total = sum(sizes.values())
    for name in counts:  # the weights only select; the sizes (192 and 288 videos) set the proportion
        assert abs(counts[name] / sum(counts.values()) - sizes[name] / total) < 0.02, (counts, sizes)


def test_the_paper_config_has_the_released_downstream_sections():
    cfg = load_config(ROOT / "jobs/configs/ppma_vitb.yaml")
    for stage, lr in ((cfg.ft, 2e-3), (cfg.lp, 1.6e-2)):
        assert (stage.epochs, stage.batch_size, stage.drop_path_rate) == (30, 32, 0.1)
        assert (stage.optim.layer_decay, stage.optim.layer_decay_style, stage.optim.lr) == (0.75, "release", lr)
        assert (stage.randaug_ops, stage.randaug_magnitude, stage.random_erase) == (4, 7, 0.25)
    assert cfg.align.mix_by == "sizes" and cfg.align.optim.layer_decay_style == "release"


@pytest.mark.parametrize("key", ["align.randaug_magnitude=11", "ft.optim.layer_decay_style=beit"])
def test_recipe_keys_reject_values_outside_their_range(key):
    from ppma_ray.config import ConfigError

    with pytest.raises(ConfigError, match=key.split("=")[0]):
        load_config(ROOT / "jobs/configs/demo.yaml", [key])


@pytest.mark.parametrize("kind", ["mae", "align", "ft", "lp"])
def test_the_paper_config_trains_a_step_of_every_stage(kind, demo_root):
    """ppma_vitb.yaml's own stage sections (layer decay, RandAugment, erasing, Mixup/CutMix, the LP's
    frozen trunk with drop-path) build through the worker's ``setup`` and take one step on CPU, with
    the demo data as sources, a small clip and a two-block ViT (block 1 has the drop-path). (A whole run of the paper
    config is what benchmarks/gpu_check.sh does, stage 1, on a GPU machine.)"""
    from ppma_ray.data.transforms import TrainTransform
    from ppma_ray.train.config import RunOptions
    from ppma_ray.train.loop import setup
    from ppma_ray.train.optim import lr_at
    from ppma_ray.train.step import WorkerContext, train_step

    sets = ["data.sources.nohuman={manifest: 'demo:nohuman'}", "data.sources.synthetic={manifest: 'demo:synthetic'}",
            f"data.demo_root={demo_root}", "data.clip={num_frames: 8, clip_seconds: 1.0, img_size: 32, short_side: 36}",
            "model.preset=vit_tiny", "model.depth=2", "model.decoder_depth=1", "model.patch_size=16",
            "scaling.use_gpu=false", "ft.mix={nohuman: 1.0}", "lp.mix={nohuman: 1.0}"]
    cfg = load_config(ROOT / "jobs/configs/ppma_vitb.yaml", sets)
    stage_cfg = getattr(cfg, kind)
    ctx = WorkerContext(0, 1, torch.device("cpu"), cfg.data.clip, cfg.data.decode)
    stage = setup(cfg, RunOptions(kind), ctx)
    transform = TrainTransform(cfg.data.clip, stage_cfg.randaug_ops, stage_cfg.randaug_magnitude)
    raw = torch.randint(0, 256, (8, 40, 48, 3), dtype=torch.uint8).numpy()
    video = torch.from_numpy(np.stack([transform(raw, seed=i) for i in range(4)]))
    batch = {"video": video, "label": torch.tensor([0, 1, 2, 3]), "source": torch.tensor([0, 0, 1, 1] if kind == "align" else [0] * 4)}
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    torch.manual_seed(0)
    result = train_step(ctx, stage.model, stage.loss_fn, stage.optimizer, stage.params, batch,
                        lr_at(5, 10, stage_cfg.optim), stage_cfg.optim.clip_grad)
    assert bool(result.taken) and torch.isfinite(result.loss)
    changed = {k for k, v in stage.model.state_dict().items() if not torch.equal(v, before[k])}
    if kind == "lp":  # the frozen trunk is untouched even with drop-path active
        assert changed and all(k.startswith("heads.") for k in changed)
        assert stage.model.blocks.training  # drop-path on, as released
    else:
        assert any(k.startswith(("blocks.", "encoder.blocks.")) for k in changed)
