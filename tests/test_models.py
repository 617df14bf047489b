import numpy as np
import pytest
import torch

from ppma_ray.models import PRESETS, create_model, flops
from ppma_ray.models.checkpoint import load_trunk
from ppma_ray.models.mae import random_mask

SMALL = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2)  # 2 x 4 x 4 = 32 tokens


def tiny(kind="mae", **kw):
    return create_model("vit_tiny", kind, **{**SMALL, "depth": 2, **kw})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_runs_at_a_small_input(name):
    """Each preset's widths and heads, two blocks deep (building ViT-L's 24 blocks only costs time)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 32, 32)
    mae = create_model(name, "mae", **SMALL, depth=2)
    assert mae.encoder.embed_dim == PRESETS[name]["embed_dim"]
    loss, pred, mask = mae(x)
    assert pred.shape == (1, 32, 3 * 2 * 8 * 8) and mask.shape == (1, 32) and torch.isfinite(loss)
    clf = create_model(name, "classifier", num_classes=11, **SMALL, depth=2)
    assert clf(x).shape == (1, 11)


def test_tubelet_embedding_is_the_conv3d_it_stores():
    """The embedding runs as a matmul over tubelets but keeps a Conv3d's weights (VideoMAE's layout):
    its output is that convolution's, token for token in (t, h, w) raster order, on a non-square clip."""
    torch.manual_seed(0)
    model = create_model("vit_tiny", "classifier", num_classes=3, img_size=32, num_frames=4, patch_size=8,
                         tubelet_size=2, depth=1).double()
    embed = model.patch_embed
    x = torch.randn(2, 3, 6, 16, 24, dtype=torch.float64)
    want = torch.nn.functional.conv3d(x, embed.proj.weight, embed.proj.bias, stride=(2, 8, 8))  # (B, D, 3, 2, 3)
    torch.testing.assert_close(embed(x), want.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masking, ratio, expected", [("random", 0.9, 28), ("random", 0.75, 24), ("tube", 0.9, 2 * 14)])
def test_masking_keeps_the_exact_count_and_only_visible_tokens_reach_the_blocks(masking, ratio, expected):
    m = tiny(masking=masking, mask_ratio=ratio)
    mask = random_mask(m.cfg, 3)
    assert mask.dtype == torch.bool and (mask.sum(1) == expected).all()
    if masking == "tube":  # the same spatial positions in both temporal slices
        assert torch.equal(mask[:, :16], mask[:, 16:])
    seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    m(torch.randn(3, 3, 4, 32, 32), mask)
    assert seen == [32 - expected]


def _reference_loss(video, pred, mask, t=2, p=8):
    """float64 numpy: unnormalize, patchify (channel fastest), per-channel norm, masked MSE."""
    v = video.double().numpy()
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1, 1)
    v = v * std + mean
    b, c, T, H, W = v.shape
    losses, total = 0.0, 0
    for i in range(b):
        tok = 0
        for ti in range(T // t):
            for hi in range(H // p):
                for wi in range(W // p):
                    cube = v[i, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p]  # C, t, p, p
                    px = cube.reshape(c, -1).T  # (t*p*p, C)
                    px = (px - px.mean(0)) / np.sqrt(px.var(0, ddof=1) + 1e-6)
                    if mask[i, tok]:
                        losses += ((pred[i, tok].double().numpy() - px.reshape(-1)) ** 2).mean()
                        total += 1
                    tok += 1
    return losses / total


def test_loss_matches_an_independent_float64_reference():
    torch.manual_seed(1)
    m = tiny()
    video = torch.randn(2, 3, 4, 32, 32)
    mask = random_mask(m.cfg, 2)
    loss, pred, _ = m(video, mask)
    assert loss.item() == pytest.approx(_reference_loss(video, pred.detach(), mask), rel=1e-5)


def test_gradient_reaches_every_trainable_parameter_and_none_in_linear_probe():
    torch.manual_seed(0)
    m = tiny(drop_path_rate=0.1)
    m(torch.randn(2, 3, 4, 32, 32))[0].backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    clf = tiny("classifier", num_classes=5, drop_path_rate=0.1)
    clf.set_linear_probe(True)
    clf.train()
    assert not clf.blocks.training and clf.heads.training
    clf(torch.randn(2, 3, 4, 32, 32)).sum().backward()
    for n, p in clf.named_parameters():
        assert (p.grad is not None) == n.startswith("heads."), n


def test_transfer_from_mae_to_classifier_drops_decoder_norm_and_heads():
    mae = tiny()
    clf = tiny("classifier", num_classes={"nohuman": 3, "synthetic": 4})
    report = load_trunk(clf, {"model": {f"module.{k}": v for k, v in mae.state_dict().items()}})
    assert report.unexpected == []
    assert report.missing == []  # fc_norm is re-initialised, as the method says: not missing, not loaded
    assert "fc_norm.weight" not in report.loaded and torch.equal(clf.fc_norm.weight, torch.ones_like(clf.fc_norm.weight))
    assert any(k.startswith("module.decoder.") for k in report.dropped) and "module.mask_token" in report.dropped
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, mae.encoder.blocks[1].mlp.fc2.weight)
    # and back from a classifier into an MAE encoder
    mae2 = tiny()
    report = load_trunk(mae2, clf.state_dict())
    assert torch.equal(mae2.encoder.patch_embed.proj.weight, clf.patch_embed.proj.weight)
    assert report.missing == [] and "norm.weight" not in report.loaded


def test_transfer_shape_mismatch_names_the_cause():
    src = tiny(tubelet_size=1)
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight.*tubelet x patch size \(1, 8, 8\) vs \(2, 8, 8\)"):
        load_trunk(tiny("classifier", num_classes=2), src.state_dict())


def test_timm_layer_decay_factory_works_unchanged():
    from timm.optim import create_optimizer_v2

    clf = tiny("classifier", num_classes=3)
    opt = create_optimizer_v2(clf, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = {round(g["lr_scale"], 6) for g in opt.param_groups}
    assert len(scales) == 4  # stem, block 0, block 1, (fc_norm + head)
    for g in opt.param_groups:
        if g["weight_decay"] > 0:
            assert all(p.ndim > 1 for p in g["params"])


def test_flops_vit_base_and_mae_costs_about_a_fifth_of_finetuning():
    mae = flops(create_model("vit_base", "mae"))
    ft = flops(create_model("vit_base", "classifier", num_classes=150))
    assert 0.15 < mae / ft < 0.25
    assert abs(ft - 360.7e9) / 360.7e9 < 0.01  # 12 blocks x 1568 tokens x 768 + tubelet embedding + head


def test_checkpoints_are_weights_only(tmp_path):
    from safetensors.torch import save_file

    from ppma_ray.models.checkpoint import read_state_dict

    m = tiny()
    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    torch.save({"model": m.state_dict()}, tmp_path / "m.pth")
    for f in ("m.safetensors", "m.pth"):
        assert set(read_state_dict(tmp_path / f)) == set(m.state_dict())
    torch.save({"model": m.state_dict(), "evil": object()}, tmp_path / "pickled.pth")
    with pytest.raises(Exception):
        read_state_dict(tmp_path / "pickled.pth")
