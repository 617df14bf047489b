import pytest
import torch

from ppma_ray.models import create_model
from ppma_ray.models.export import from_hf, to_hf

transformers = pytest.importorskip("transformers")
SMALL = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, depth=2)


def _randomize(model):
    """Non-trivial biases and norms, so a wrong mapping cannot hide behind zeros and ones."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_classifier_export_matches_transformers_and_round_trips(tmp_path):
    ours = _randomize(create_model("vit_tiny", "classifier", num_classes=7, **SMALL))
    to_hf(ours, tmp_path, id2label={i: f"class{i}" for i in range(7)})
    hf = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path).eval()
    assert hf.config.id2label[3] == "class3"
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = ours(x)
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits  # HF wants (B, T, C, H, W)
        back = from_hf(tmp_path).eval()(x)
    assert (ref - theirs).abs().max() <= 1e-4
    assert torch.equal(ref, back)


def test_pretraining_export_matches_transformers(tmp_path):
    ours = _randomize(create_model("vit_tiny", "mae", decoder_style="videomae", **SMALL))
    to_hf(ours, tmp_path)
    hf = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, torch.randperm(32)[:24]] = True
    with torch.no_grad():
        _, pred, _ = ours(x, mask)
        theirs = hf(pixel_values=x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits
        back = from_hf(tmp_path).eval()(x, mask)[1]
    assert (pred[mask].reshape(2, 24, -1) - theirs).abs().max() <= 1e-4
    assert torch.equal(pred, back)


def test_ppma_style_decoder_refuses_pretraining_export(tmp_path):
    with pytest.raises(ValueError, match="cannot express"):
        to_hf(create_model("vit_tiny", "mae", **SMALL), tmp_path)
