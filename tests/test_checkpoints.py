"""Weights from outside: Hugging Face folders written by transformers itself, the released PPMA
(omnivision) layout and its ensemble file, VideoMAE names; and nothing loads partially by accident."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ppma_ray.models import create_model
from ppma_ray.models.checkpoint import CheckpointError, detect_layout, load_trunk, load_trunks, models_in, read_state_dict

SMALL = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, depth=2)


def _randomize(model, seed=0):
    """Non-trivial biases and norms, so a wrong mapping cannot hide behind zeros and ones."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _hf_config(transformers, **kw):
    return transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, decoder_num_attention_heads=2, decoder_hidden_size=32,
        decoder_num_hidden_layers=1, decoder_intermediate_size=128, layer_norm_eps=1e-6, **kw)


def _as_bin(folder):
    """The folder as a Hub repo that ships ``pytorch_model.bin`` (same on-disk names as transformers 4.x
    writes), with the attention biases renamed to ``query.bias``/``value.bias`` if asked."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _rename_biases(folder):
    path = folder / "model.safetensors"
    state = {k.replace("attention.attention.q_bias", "attention.attention.query.bias")
              .replace("attention.attention.v_bias", "attention.attention.value.bias"): v
             for k, v in load_file(str(path)).items()}
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("storage", ["safetensors", "bin", "query.bias names"])
def test_a_transformers_classifier_imports_with_its_outputs(tmp_path, storage):
    transformers = pytest.importorskip("transformers")
    from ppma_ray.models.export import from_hf

    torch.manual_seed(0)
    hf = _randomize(transformers.VideoMAEForVideoClassification(_hf_config(transformers, num_labels=5)))
    hf.save_pretrained(tmp_path)
    assert "videomae.encoder.layer.0.attention.attention.q_bias" in load_file(str(tmp_path / "model.safetensors"))
    if storage == "bin":
        _as_bin(tmp_path)
    elif storage != "safetensors":
        _rename_biases(tmp_path)
    x = torch.randn(2, 3, 4, 32, 32)
    ours = from_hf(tmp_path).eval()
    with torch.no_grad():
        ref = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits
        assert (ours(x) - ref).abs().max() <= 1e-4
        # the same folder as --init-from: every trunk tensor loads (strict), fc_norm is re-initialised
        clf = create_model("vit_tiny", "classifier", num_classes=5, embed_dim=64, num_heads=4, **SMALL).eval()
        report = load_trunk(clf, tmp_path)
        assert report.layout == "hf" and not report.missing and not report.unexpected
        tokens = hf.videomae(pixel_values=x.permute(0, 2, 1, 3, 4)).last_hidden_state
        assert (clf.forward_features(x) - tokens).abs().max() <= 1e-4


def test_a_sharded_transformers_folder_loads_whole_and_a_missing_shard_is_named(tmp_path):
    """``save_pretrained`` past ``max_shard_size`` writes ``model-0000K-of-0000N.safetensors`` and
    their index (the Hub's large models ship so; transformers 4.x wrote ``pytorch_model-*.bin`` shards
    the same way). Such a folder used to be refused as one without weights; it loads whole, as
    ``from_hf`` and as ``--init-from``, and counts as one model. A missing shard or a torn index is named."""
    import json

    transformers = pytest.importorskip("transformers")
    from ppma_ray.models.export import from_hf

    torch.manual_seed(0)
    hf = _randomize(transformers.VideoMAEForVideoClassification(_hf_config(transformers, num_labels=5)))
    hf.save_pretrained(tmp_path / "whole")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    whole = read_state_dict(tmp_path / "whole")
    # the same shards as .bin files with their index, as transformers 4.x wrote them (5.x still reads them)
    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "config.json").write_text((sharded / "config.json").read_text())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    for shard in shards:
        torch.save(load_file(str(shard)), bins / shard.name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin"))
    index["weight_map"] = {k: v.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
                           for k, v in index["weight_map"].items()}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6):  # transformers refuses .bin with older torch
        assert not transformers.VideoMAEForVideoClassification.from_pretrained(bins, output_loading_info=True)[1]["missing_keys"]
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits
        for folder in (sharded, bins):
            state = read_state_dict(folder)
            assert state.keys() == whole.keys() and all(torch.equal(state[k], whole[k]) for k in whole)
            assert models_in(folder) == 1
            assert (from_hf(folder).eval()(x) - ref).abs().max() <= 1e-4
            clf = create_model("vit_tiny", "classifier", num_classes=5, embed_dim=64, num_heads=4, **SMALL)
            report = load_trunk(clf, folder)
            assert report.layout == "hf" and not report.missing and not report.unexpected
    shards[1].unlink()
    for check in (models_in, read_state_dict):
        with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: shard {shards[1].name} is missing"):
            check(sharded)
    (bins / "pytorch_model.bin.index.json").write_text('{"metadata": {}, "weight_map": {')
    with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json: not a shard index"):
        load_trunk(clf, bins)


def test_a_transformers_pretraining_model_imports_with_its_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ppma_ray.models.export import from_hf

    torch.manual_seed(0)
    # the Hub's pretraining checkpoints (MCG-NJU/videomae-*) end the encoder with a LayerNorm
    hf = _randomize(transformers.VideoMAEForPreTraining(_hf_config(transformers, norm_pix_loss=True, use_mean_pooling=False)))
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    x = torch.rand(2, 3, 4, 32, 32)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, torch.randperm(32)[:24]] = True
    with torch.no_grad():
        out = hf(pixel_values=x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask)
        loss, pred, _ = ours(x, mask)
    assert (pred[mask].reshape(2, 24, -1) - out.logits).abs().max() <= 1e-4
    # decoder_style="videomae" divides the target by std + 1e-6, as transformers does: same loss
    assert abs(loss.item() - out.loss.item()) <= 1e-4 * max(1.0, abs(out.loss.item()))


def test_an_exported_model_loads_in_transformers_with_nothing_missing(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ppma_ray.models.export import to_hf

    ours = _randomize(create_model("vit_tiny", "classifier", num_classes=3, **SMALL))
    to_hf(ours, tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "videomae.encoder.layer.1.attention.attention.q_bias" in names  # what transformers writes
    hf, info = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def _released_sinusoid_table(n_position, d_hid):
    """``get_sinusoid_encoding_table`` of the released code (omnivision/models/vision_transformer.py),
    verbatim: the buffer its ViT saves as ``pos_embed`` with ``learnable_pos_embed: False``."""
    import numpy as np

    def get_position_angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    sinusoid_table = np.array([get_position_angle_vec(pos_i) for pos_i in range(n_position)])
    sinusoid_table[:, 0::2] = np.sin(sinusoid_table[:, 0::2])  # dim 2i
    sinusoid_table[:, 1::2] = np.cos(sinusoid_table[:, 1::2])  # dim 2i+1
    return torch.FloatTensor(sinusoid_table).unsqueeze(0)


def _omnivision(model, k_bias_seed=1) -> dict:
    """A state dict in the released PPMA code's layout (``MIMOHeadWrapper``: ``trunk.`` + ``heads.``):
    ``patch_embed.proj`` is ``Sequential(PadIm2Video, Conv3d)``, attention has one full qkv bias, the
    trunk's ``norm`` is the pooled feature's LayerNorm, the head is ``Sequential(Linear)``, and the
    sinusoid ``pos_embed`` is saved (a persistent buffer there)."""
    state = model.state_dict()
    g = torch.Generator().manual_seed(k_bias_seed)
    out = {"trunk.pos_embed": _released_sinusoid_table(model.cfg.num_patches, model.cfg.embed_dim)}
    for k, v in state.items():
        if k.startswith("patch_embed.proj."):
            out["trunk.patch_embed.proj.1." + k.split(".")[-1]] = v
        elif k.endswith("attn.q_bias"):
            v_bias = state[k.replace("q_bias", "v_bias")]
            k_bias = torch.randn(v.shape, generator=g)  # any k bias: the softmax cancels it
            out["trunk." + k.replace("q_bias", "qkv.bias")] = torch.cat([v, k_bias, v_bias])
        elif k.endswith("attn.v_bias"):
            continue
        elif k.startswith("fc_norm."):
            out["trunk.norm." + k.split(".")[-1]] = v
        elif k.startswith("heads."):
            out["heads.0.0." + k.split(".")[-1]] = v
        else:
            out["trunk." + k] = v
    return out


def _adamw_state(state: dict) -> dict:
    """A real AdamW state dict after one step over ``state``'s tensors, as trainers save it."""
    params = [torch.nn.Parameter(v.detach().clone().float()) for v in state.values()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def test_the_released_ppma_layout_loads_completely_and_gives_the_same_logits(tmp_path):
    ours = _randomize(create_model("vit_tiny", "classifier", num_classes=4, **SMALL))
    # the whole file as the released trainer writes it (OmnivisionTrainer.save_checkpoint)
    torch.save({"model": _omnivision(ours), "optimizer": _adamw_state(_omnivision(ours)), "epoch": 50,
                "loss": {}, "steps": {"train": 1000, "val": 20}}, tmp_path / "vitb_b128_ep200_labels.pt")
    assert detect_layout(_omnivision(ours)) == "omnivision"
    fresh = create_model("vit_tiny", "classifier", num_classes=4, **SMALL).eval()
    report = load_trunk(fresh, tmp_path / "vitb_b128_ep200_labels.pt", keep_final_norm=True)
    assert report.missing == [] and report.unexpected == []
    fresh.heads.load_state_dict(ours.heads.state_dict())  # heads never transfer; copy to compare logits
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (fresh(x) - ours(x)).abs().max() <= 1e-5


def test_a_checkpoint_saved_by_videomae_training_loads_with_its_args(tmp_path):
    """VideoMAE's ``save_model`` (as facebookresearch/mae's) stores the run's ``argparse.Namespace``
    beside the weights: ``{"model", "optimizer", "epoch", "scaler", "args"}``. Weights-only loading
    refused the whole file for that class, so no checkpoint of a VideoMAE run could be used; the
    Namespace is allowed now, as data. A class that is not data is still refused, and named."""
    import argparse

    import numpy as np

    src = _randomize(create_model("vit_tiny", "mae", **SMALL))
    args = argparse.Namespace(model="pretrain_videomae_base_patch16_224", mask_type="tube", mask_ratio=0.9,
                              window_size=(2, 4, 4), num_frames=4, input_size=32, lr=1.5e-4, epochs=800,
                              output_dir="output/pretrain", normlize_target=True, device="cuda")
    saved = {"model": src.state_dict(), "optimizer": _adamw_state(src.state_dict()), "epoch": 799,
             "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args}
    torch.save(saved, tmp_path / "checkpoint-799.pth")
    clf = create_model("vit_tiny", "classifier", num_classes=3, **SMALL)
    report = load_trunk(clf, tmp_path / "checkpoint-799.pth")
    assert report.layout == "videomae" and not report.missing and not report.unexpected
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, src.encoder.blocks[1].mlp.fc2.weight)
    assert models_in(tmp_path / "checkpoint-799.pth") == 1
    torch.save({**saved, "max_accuracy": np.float64(0.81)}, tmp_path / "with_numpy.pth")
    with pytest.raises(CheckpointError, match=r"with_numpy.pth: holds a numpy\S*scalar, which is not weights"):
        load_trunk(clf, tmp_path / "with_numpy.pth")


def test_a_learned_position_table_is_refused_not_dropped(tmp_path):
    """The released ViT's default is ``learnable_pos_embed: True`` (the paper's config turns it off),
    and VideoMAE's ``use_learnable_pos_emb`` saves a learned ``pos_embed`` too. Our models add the
    fixed sinusoid table, so such a table used to be dropped by the transfer rule without a word and
    the model changed; now it has no place in the model, as any other tensor would. The released
    sinusoid table, stored in fp16 as well, is still dropped: it is what our models add."""
    from ppma_ray.models.averaging import LearnedAverage
    from ppma_ray.models.checkpoint import load_trunks

    ours = _randomize(create_model("vit_tiny", "classifier", num_classes=4, **SMALL))
    state = _omnivision(ours)
    clf = create_model("vit_tiny", "classifier", num_classes=4, **SMALL)
    half = {**state, "trunk.pos_embed": state["trunk.pos_embed"].half()}
    assert not load_trunk(clf, half).unexpected
    learned = {**state, "trunk.pos_embed": state["trunk.pos_embed"] + 0.02 * torch.randn_like(state["trunk.pos_embed"])}
    torch.save({"model": learned}, tmp_path / "learned_pos.pt")
    with pytest.raises(CheckpointError, match="no place in the model: pos_embed; its pos_embed is a learned position table"):
        load_trunk(clf, tmp_path / "learned_pos.pt")
    assert load_trunk(clf, learned, strict=False).unexpected == ["pos_embed"]  # partial on purpose: reported
    # VideoMAE with use_learnable_pos_emb: a zeros-initialised table, never the sinusoid
    videomae = {"encoder.pos_embed": torch.zeros(1, ours.cfg.num_patches, ours.cfg.embed_dim),
                **{f"encoder.{k}": v for k, v in ours.state_dict().items() if not k.startswith("heads.")}}
    with pytest.raises(CheckpointError, match="videomae layout.*learned position table"):
        load_trunk(create_model("vit_tiny", "mae", **SMALL), videomae)
    with pytest.raises(CheckpointError, match="no place for: pos_embed"):  # learned averaging, in the worker
        LearnedAverage(clf, load_trunks([learned, learned]))


def test_the_released_ensemble_file_gives_its_models_for_averaging(tmp_path):
    a = _randomize(create_model("vit_tiny", "classifier", num_classes=4, **SMALL), seed=1)
    b = _randomize(create_model("vit_tiny", "classifier", num_classes=4, **SMALL), seed=2)
    path = tmp_path / "vitb_b128_ep200_ensemble_sim_inpk150_checkpoint_50_labels.pt"
    torch.save({"ensemble_weights": [_omnivision(a), _omnivision(b)]}, path)
    trunks = load_trunks([path])
    assert len(trunks) == 2 and torch.equal(trunks[1]["blocks.1.attn.v_bias"], b.blocks[1].attn.v_bias)
    assert torch.equal(trunks[0]["fc_norm.weight"], a.fc_norm.weight)  # averaged too, as released
    with pytest.raises(CheckpointError, match="an ensemble of 2 models"):
        read_state_dict(path)


def test_models_are_counted_in_every_format_and_a_torn_file_is_named(tmp_path):
    """``models_in`` (what the evaluate job checks ``--alpha`` against, before Ray) reads only the
    keys: a mapped zip file, the legacy torch format (which cannot be mapped), a safetensors header."""
    src = _omnivision(_randomize(create_model("vit_tiny", "classifier", num_classes=4, **SMALL)))
    torch.save({"ensemble_weights": [src, src, src]}, tmp_path / "ensemble.pt")
    torch.save({"model": src}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file(src, str(tmp_path / "model.safetensors"))
    assert [models_in(tmp_path / f) for f in ("ensemble.pt", "legacy.pth", "model.safetensors")] == [3, 1, 1]
    assert models_in(tmp_path) == 1  # a folder: its model.safetensors
    for name in ("ensemble.pt", "model.safetensors"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / f"torn-{name}").write_bytes(whole[: len(whole) // 2])
        with pytest.raises(CheckpointError, match=f"torn-{name}: cannot be read as weights"):
            models_in(tmp_path / f"torn-{name}")


def test_a_missing_or_extra_tensor_raises_naming_it_unless_partial_on_purpose(tmp_path):
    src = _randomize(create_model("vit_tiny", "mae", **SMALL))
    state = {k: v for k, v in src.state_dict().items() if k != "encoder.blocks.1.attn.v_bias"}
    save_file(state, str(tmp_path / "model.safetensors"))
    clf = create_model("vit_tiny", "classifier", num_classes=2, **SMALL)
    with pytest.raises(CheckpointError, match=r"model.safetensors \(videomae layout\).*blocks\.1\.attn\.v_bias"):
        load_trunk(clf, tmp_path)
    report = load_trunk(clf, tmp_path, strict=False)
    assert report.missing == ["blocks.1.attn.v_bias"]
    deeper = create_model("vit_tiny", "mae", **{**SMALL, "depth": 3}).state_dict()
    with pytest.raises(CheckpointError, match=r"no place in the model: blocks\.2\."):
        load_trunk(clf, deeper)


def test_a_folder_in_an_unknown_layout_fails_instead_of_training_from_random_init(tmp_path):
    save_file({"backbone.stem.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor\\(s\\) the model needs are not in it: blocks.0"):
        load_trunk(create_model("vit_tiny", "classifier", num_classes=2, **SMALL), tmp_path)


def test_the_jobs_refuse_weights_that_do_not_fit_before_ray_starts(tmp_path, demo_root, capsys, monkeypatch):
    """--init-from a file that lacks a tensor, and --alpha against an ensemble file: exit 2 with one
    line, no Ray started; --init-from-partial gets past the check and says what it leaves out."""
    from conftest import ROOT, TINY

    from ppma_ray.cli import check_weights, evaluate, pretrain
    from ppma_ray.config import load_config

    def no_ray(cfg):
        raise AssertionError("the job started Ray")

    for module in (pretrain, evaluate):
        monkeypatch.setattr(module, "start_ray", no_ray)

    src = create_model("vit_tiny", "classifier", num_classes=2, depth=2, img_size=32, num_frames=8, patch_size=16)
    state = {k: v for k, v in src.state_dict().items() if k != "blocks.0.mlp.fc1.weight"}
    save_file(state, str(tmp_path / "partial.safetensors"))
    torch.save({"ensemble_weights": [_omnivision(src), _omnivision(src)]}, tmp_path / "ensemble.pt")
    sets = [*TINY, f"data.demo_root={demo_root}", f"run.storage_path={tmp_path / 'runs'}"]
    common = [a for s in sets for a in ("--set", s)]

    def job(main, *args) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([*args, *common])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    err = job(pretrain.main, "--stage", "align")  # stage 1 never ran: no silent random init
    assert "--stage align needs a stage-1 checkpoint" in err and str(tmp_path / "runs") in err and "--random-init" in err
    err = job(pretrain.main, "--stage", "mae", "--random-init")
    assert "--random-init is for --stage align without --init-from" in err
    err = job(pretrain.main, "--stage", "align", "--init-from", str(tmp_path / "partial.safetensors"))
    assert "partial.safetensors (videomae layout)" in err and "blocks.0.mlp.fc1.weight" in err
    err = job(evaluate.main, "--checkpoint", str(tmp_path / "ensemble.pt"), "--alpha", "0.2", "0.3", "0.5",
              "--task", "demo:motion")
    assert "--alpha: 3 coefficients for 2 models" in err
    (tmp_path / "downloading.pth").write_bytes(b"")  # a download that never got its first byte
    for main, flag in ((evaluate.main, "--checkpoint"), (pretrain.main, "--init-from")):
        err = job(main, flag, str(tmp_path / "downloading.pth"), *(["--task", "demo:motion"] if flag == "--checkpoint" else []))
        assert err.endswith("downloading.pth: cannot be read as weights (EOFError)"), err  # was an IndexError's traceback
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", sets)
    check_weights(cfg, str(tmp_path / "partial.safetensors"), partial=True)
    assert "missing ['blocks.0.mlp.fc1.weight']" in capsys.readouterr().err
