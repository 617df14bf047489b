"""Hugging Face ``transformers`` VideoMAE interop (optional extra ``hf``).

Exports a classifier to ``VideoMAEForVideoClassification`` and a pretraining model to
``VideoMAEForPreTraining`` (``config.json`` + ``model.safetensors``, the tensor names transformers
itself writes on disk, so 4.x and 5.x both load them), and imports any VideoMAE folder transformers
wrote (``model.safetensors`` or ``pytorch_model.bin``). Only what HF reproduces exactly is exported:

* HF's decoder projects to decoder width *before* adding positions; a PPMA-style decoder
  (``decoder_style="ppma"``) adds them before, so it cannot be exported as a pretraining model
  (its encoder can, as a classifier trunk).
* A classifier must have exactly one head (HF has one ``classifier``).
* HF builds ``fc_norm`` and the decoder's ``norm`` with LayerNorm's default eps 1e-5 (ours: 1e-6);
  the resulting difference is ~1e-6 relative and documented, not hidden.
* HF takes ``pixel_values`` as (B, T, C, H, W); ours is (B, C, T, H, W).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ppma_ray.models.checkpoint import HF_BLOCK, read_state_dict
from ppma_ray.models.heads import VideoClassifier
from ppma_ray.models.mae import PretrainVideoMAE
from ppma_ray.models.config import ViTConfig

# one-to-one renames outside the blocks (ours -> HF), used in both directions
PRETRAIN_RENAMES = {
    **{f"encoder.norm.{wb}": f"videomae.layernorm.{wb}" for wb in ("weight", "bias")},
    **{f"decoder.{n}.{wb}": f"decoder.{n}.{wb}" for n in ("norm", "head") for wb in ("weight", "bias")},
    "encoder_to_decoder.weight": "encoder_to_decoder.weight",
    "mask_token": "mask_token",
}

def _hf_config(cfg: ViTConfig, pretraining: bool, id2label: dict[int, str] | None = None):
    from transformers import VideoMAEConfig

    kw = dict(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans, num_frames=cfg.num_frames,
        tubelet_size=cfg.tubelet_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        hidden_act="gelu", qkv_bias=True, layer_norm_eps=1e-6, use_mean_pooling=not pretraining,
        decoder_num_attention_heads=cfg.decoder_num_heads, decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth, decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        norm_pix_loss=True,
    )
    if id2label is not None:
        kw.update(id2label={int(k): v for k, v in id2label.items()}, label2id={v: int(k) for k, v in id2label.items()})
    return VideoMAEConfig(**kw)


def _blocks_to_hf(state: dict, src: str, dst: str, depth: int) -> dict:
    out = {}
    for i in range(depth):
        s, d = f"{src}{i}.", f"{dst}{i}."
        q, k, v = state[s + "attn.qkv.weight"].chunk(3)
        out[d + "attention.attention.query.weight"] = q
        out[d + "attention.attention.key.weight"] = k
        out[d + "attention.attention.value.weight"] = v
        # the names on disk in every transformers version: 4.x has q_bias / v_bias parameters, 5.x
        # renames them to query.bias / value.bias when loading and back when saving
        out[d + "attention.attention.q_bias"] = state[s + "attn.q_bias"]
        out[d + "attention.attention.v_bias"] = state[s + "attn.v_bias"]
        for ours, theirs in HF_BLOCK.items():
            for wb in ("weight", "bias"):
                out[f"{d}{theirs}.{wb}"] = state[f"{s}{ours}.{wb}"]
    return out


def _blocks_from_hf(state: dict, src: str, dst: str, depth: int) -> dict:
    out = {}
    for i in range(depth):
        s, d = f"{src}{i}.", f"{dst}{i}."
        a = s + "attention.attention."
        out[d + "attn.qkv.weight"] = torch.cat([state[a + "query.weight"], state[a + "key.weight"], state[a + "value.weight"]])
        out[d + "attn.q_bias"] = state[a + "q_bias"] if a + "q_bias" in state else state[a + "query.bias"]
        out[d + "attn.v_bias"] = state[a + "v_bias"] if a + "v_bias" in state else state[a + "value.bias"]
        for ours, theirs in HF_BLOCK.items():
            for wb in ("weight", "bias"):
                out[f"{d}{ours}.{wb}"] = state[f"{s}{theirs}.{wb}"]
    return out


def to_hf(model: VideoClassifier | PretrainVideoMAE, out_dir: str | os.PathLike,
          id2label: dict[int, str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``transformers``' VideoMAE classes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if isinstance(model, PretrainVideoMAE):
        if cfg.decoder_style != "videomae":
            raise ValueError("a decoder_style='ppma' MAE adds positions before its projection, which HF's "
                             "VideoMAEForPreTraining cannot express; export the trunk as a classifier instead")
        trunk = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        hf = _trunk_to_hf(trunk, cfg)
        hf.update({theirs: state[ours] for ours, theirs in PRETRAIN_RENAMES.items()})
        hf.update(_blocks_to_hf(state, "decoder.blocks.", "decoder.decoder_layers.", cfg.decoder_depth))
        hf_cfg = _hf_config(cfg, pretraining=True)
        hf_cfg.architectures = ["VideoMAEForPreTraining"]
    else:
        if len(model.heads) != 1:
            raise ValueError(f"HF classifiers have one head; this model has {list(model.heads)}")
        name = model.default_head
        hf = _trunk_to_hf(state, cfg)
        for wb in ("weight", "bias"):
            hf[f"fc_norm.{wb}"] = state[f"fc_norm.{wb}"]
            hf[f"classifier.{wb}"] = state[f"heads.{name}.{wb}"]
        n = model.num_classes[name]
        hf_cfg = _hf_config(cfg, pretraining=False, id2label=id2label or {i: f"LABEL_{i}" for i in range(n)})
        hf_cfg.architectures = ["VideoMAEForVideoClassification"]
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg.to_json_file(str(out / "config.json"))
    return out


def _trunk_to_hf(state: dict, cfg: ViTConfig) -> dict:
    hf = {
        "videomae.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "videomae.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
    }
    hf.update(_blocks_to_hf(state, "blocks.", "videomae.encoder.layer.", cfg.depth))
    return hf


def hf_vit_config(c: dict) -> ViTConfig:
    """Our architecture for a transformers ``VideoMAEConfig`` (as a dict from its config.json)."""
    if c.get("model_type", "videomae") != "videomae":
        raise ValueError(f"a {c.get('model_type')!r} model, not VideoMAE")
    if c.get("use_cls_token") or not c.get("qkv_bias", c.get("qv_bias", True)) or c.get("hidden_act", "gelu") != "gelu":
        raise ValueError("only VideoMAE with q/v biases, GELU and no CLS token maps onto our trunk")
    return ViTConfig(
        img_size=c["image_size"], num_frames=c["num_frames"], tubelet_size=c["tubelet_size"], patch_size=c["patch_size"],
        in_chans=c["num_channels"], embed_dim=c["hidden_size"], depth=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], mlp_ratio=c["intermediate_size"] / c["hidden_size"],
        decoder_embed_dim=c["decoder_hidden_size"], decoder_depth=c["decoder_num_hidden_layers"],
        decoder_num_heads=c["decoder_num_attention_heads"], decoder_style="videomae",
    ).validate()


def from_hf(path: str | os.PathLike) -> VideoClassifier | PretrainVideoMAE:
    """Build our model from a folder transformers wrote (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``, or their shards; attention biases as ``q_bias``/``v_bias`` or ``query.bias``/``value.bias``).
    Every tensor is loaded (strict)."""
    path = Path(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    cfg = hf_vit_config(hf_cfg)
    hf = read_state_dict(path)
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in hf):  # a bare VideoMAEModel
        hf = {f"videomae.{k}": v for k, v in hf.items()}
    pretraining = "decoder.head.weight" in hf
    if pretraining and "videomae.layernorm.weight" not in hf:
        raise ValueError(f"{path}: a VideoMAEForPreTraining without the encoder's final LayerNorm (use_mean_pooling=true) "
                         f"has no counterpart here; its encoder loads as a trunk (load_trunk / --init-from)")
    trunk = {"patch_embed.proj.weight": hf["videomae.embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": hf["videomae.embeddings.patch_embeddings.projection.bias"]}
    trunk.update(_blocks_from_hf(hf, "videomae.encoder.layer.", "blocks.", cfg.depth))
    if pretraining:
        model = PretrainVideoMAE(cfg)
        state = {f"encoder.{k}": v for k, v in trunk.items()}
        state.update({ours: hf[theirs] for ours, theirs in PRETRAIN_RENAMES.items()})
        state.update(_blocks_from_hf(hf, "decoder.decoder_layers.", "decoder.blocks.", cfg.decoder_depth))
    elif "classifier.weight" in hf:
        if not hf_cfg.get("use_mean_pooling", True):
            raise ValueError(f"{path}: a classifier without mean pooling (use_mean_pooling=false) has no counterpart here")
        model = VideoClassifier(cfg, num_classes=hf["classifier.weight"].shape[0])
        state = dict(trunk)
        for wb in ("weight", "bias"):
            state[f"fc_norm.{wb}"] = hf[f"fc_norm.{wb}"]
            state[f"heads.{model.default_head}.{wb}"] = hf[f"classifier.{wb}"]
    else:
        raise ValueError(f"{path}: neither VideoMAEForPreTraining nor VideoMAEForVideoClassification weights "
                         f"(a bare encoder loads as a trunk: load_trunk / --init-from)")
    model.load_state_dict(state, strict=True)
    return model
