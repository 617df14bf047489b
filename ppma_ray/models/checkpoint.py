"""Weights in, from every layout we meet, and never silently: the one reader behind ``load_trunk``,
``--init-from``, ``jobs/evaluate.py --checkpoint`` and weight averaging.

Accepted sources: our checkpoints (a checkpoint folder or its ``model.safetensors``), VideoMAE
``.pth`` files (pretraining or fine-tuned), the released PPMA (omnivision) ``.pt`` files, including
the ensemble file (``ensemble_weights``: a list of state dicts), and Hugging Face VideoMAE models (a
``save_pretrained`` folder, whole or in shards, or its ``model.safetensors`` / ``pytorch_model.bin``, or a Hub id
``hf://ORG/NAME[@REVISION]``, with the attention
biases stored as ``q_bias``/``v_bias`` (what transformers writes) or ``query.bias``/``value.bias``).

The layout is detected from the keys, then every tensor is renamed to one canonical form, the
classifier's trunk names (``patch_embed.*``, ``blocks.N.*``, ``norm.*``, ``fc_norm.*``). Then the
method's transfer rule (PPMA §4.1, §5.1) drops the decoder, the mask token, the heads and the final
norm (``norm`` of an MAE encoder, ``fc_norm`` of a classifier): the pooled-feature ``fc_norm`` is
re-initialised at every transfer. A saved ``pos_embed`` is dropped only if it is the fixed sinusoid
table our models add; a learned one has no place here. A tensor the target model needs that the source does not provide
is an error (``strict=True``, the default), as is a trunk tensor the model has no place for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ppma_ray.errors import one_line
from ppma_ray.models import hub
from ppma_ray.models.errors import CheckpointError
from ppma_ray.models.mae import PretrainVideoMAE
from ppma_ray.models.vit import sinusoid_table

Layout = Literal["videomae", "omnivision", "hf"]
NOT_TRUNK = ("decoder.", "encoder_to_decoder.", "mask_token", "decoder_pos_embed", "heads.", "head.", "pos_embed")
PREFIXES = ("module.", "trunk.", "_orig_mod.", "encoder.")
# files looked for in a folder, in transformers' own order: ours and transformers' safetensors, its
# shards' index (``save_pretrained`` past ``max_shard_size``), then the legacy .bin file or its index
FOLDER_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
INDEX_SUFFIX = ".index.json"
DATA_GLOBALS = [argparse.Namespace]
# torch's weights-only refusal of a class: "... Unsupported global: GLOBAL argparse.Namespace was not ..."
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
# our names -> Hugging Face VideoMAE's inside a block (the q/k/v projections are handled apart);
# the one table for both directions (export.py writes with it)
HF_BLOCK = {
    "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}


@dataclass
class TransferReport:
    layout: str = "videomae"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # needed by the model, not given
    unexpected: list[str] = field(default_factory=list)  # given, not used (and not dropped by rule)
    dropped: list[str] = field(default_factory=list)  # removed by the transfer rule

    def __str__(self) -> str:
        return (f"{self.layout} layout: loaded {len(self.loaded)} tensors; dropped by rule {len(self.dropped)}; "
                f"missing {self.missing}; unexpected {self.unexpected}")


def weights_file(source: str | os.PathLike) -> Path:
    """The weights file of ``source``: the file itself, or a folder's ``model.safetensors`` /
    ``pytorch_model.bin`` (our checkpoint folders and Hugging Face ``save_pretrained`` output) or the
    index of its shards, or that of a Hugging Face Hub repository, ``hf://ORG/NAME[@REVISION]``
    (fetched into the Hub cache)."""
    path = hub.snapshot(source) if hub.is_hub(source) else Path(source)
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder without weights (none of {', '.join(FOLDER_FILES)})")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    return path


def read_checkpoint(source: str | os.PathLike | dict, mmap: bool = False) -> list[dict[str, torch.Tensor]]:
    """Every state dict in ``source``: one, or K for an ensemble file (``ensemble_weights``).

    Files are read without executing code (``weights_only``); ``.safetensors`` directly.
    ``mmap``: the tensors stay on disk until touched, for a caller that only looks at the keys (a
    file in torch's zip format; the legacy pre-1.6 format cannot be mapped and is read whole).
    """
    if isinstance(source, dict):
        return _unwrap_all(source, "the given state dict")
    path = weights_file(source)
    if path.name.endswith(INDEX_SUFFIX):
        return [_read_shards(path)]
    if path.suffix == ".safetensors":
        return [load_file(str(path))]
    try:
        with _data_globals():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # a pickled object, a truncated file: say which file
        if found := UNSUPPORTED_GLOBAL.search(str(e)):
            raise CheckpointError(
                f"{path}: holds a {found.group(1)}, which is not weights and which weights-only loading does not "
                f"construct; where you trust the file, save its state dict alone (torch.save(torch.load(FILE, "
                f"weights_only=False)['model'], 'weights.pth')) and give that") from e
        raise CheckpointError(f"{path}: cannot be read as weights ({one_line(e)})") from e
    return _unwrap_all(obj, str(path))


def _data_globals():
    """Classes that checkpoints of the field pickle beside their weights and that hold data only,
    allowed while a file is read weights-only: ``argparse.Namespace``, the ``args`` that VideoMAE's
    and facebookresearch/mae's ``save_model`` store next to ``model``, ``optimizer`` and ``scaler``.
    Any other class still fails, and is named."""
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: for this read only
        return torch.serialization.safe_globals(DATA_GLOBALS)
    torch.serialization.add_safe_globals(DATA_GLOBALS)  # torch 2.4: no scoped form; process-wide
    return contextlib.nullcontext()


def shard_files(index: Path) -> dict[str, Path]:
    """A sharded checkpoint's index (transformers' ``*.index.json``): each tensor's shard file, every
    one checked to be there, beside the index (a name that leaves the folder is refused)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a shard index (a JSON object whose weight_map maps each tensor to its shard file)")
    files = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard {shard!r} is not a file beside the index")
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing ({len(set(weight_map.values()))} shards listed)")
        files[shard] = index.parent / shard
    return {name: files[shard] for name, shard in weight_map.items()}


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    """The one state dict a sharded checkpoint splits over its files; each tensor must be in the
    shard its index names, and a shard may hold nothing the index does not list."""
    where = shard_files(index)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(where.values())):
        part = read_checkpoint(file)[0]
        stray = sorted(k for k in part if where.get(k) != file)
        if stray:
            raise CheckpointError(f"{file}: tensors its index {index.name} does not place there: {_few(stray)}")
        state.update(part)
    if missing := sorted(set(where) - set(state)):
        raise CheckpointError(f"{index}: {len(missing)} tensor(s) it lists are not in their shard: {_few(missing)}")
    return state


def models_in(source: str | os.PathLike) -> int:
    """Models in ``source``: one per file, K for the released ensemble file. Reads the safetensors
    header or maps the torch file; no tensor is read."""
    path = weights_file(source)
    if path.name.endswith(INDEX_SUFFIX):  # one model in shards: the index names them, all there
        shard_files(path)
        return 1
    if path.suffix != ".safetensors":
        return len(read_checkpoint(path, mmap=True))
    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise CheckpointError(f"{path}: no state dict of tensors found")
    except (OSError, SafetensorError) as e:  # a truncated or foreign file: say which file
        raise CheckpointError(f"{path}: cannot be read as weights ({one_line(e)})") from e
    return 1


def read_state_dict(source: str | os.PathLike | dict) -> dict[str, torch.Tensor]:
    """The one state dict of ``source`` (an ensemble file is an error: average its models)."""
    states = read_checkpoint(source)
    if len(states) != 1:
        raise CheckpointError(f"{source if not isinstance(source, dict) else 'the state dict'}: an ensemble of "
                              f"{len(states)} models; average them (several --checkpoint, or load_trunks)")
    return states[0]


def _unwrap_all(obj, where: str) -> list[dict[str, torch.Tensor]]:
    if isinstance(obj, dict) and isinstance(obj.get("ensemble_weights"), (list, tuple)):
        return [_unwrap(s, where) for s in obj["ensemble_weights"]]
    return [_unwrap(obj, where)]


def _unwrap(obj, where: str) -> dict[str, torch.Tensor]:
    """Find the state dict inside the usual checkpoint wrappers."""
    for key in ("model", "module", "state_dict", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return _unwrap(obj[key], where)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where}: no state dict of tensors found")
    return obj


def detect_layout(state: dict[str, torch.Tensor]) -> Layout:
    """``hf`` (transformers' VideoMAE names), ``omnivision`` (the released PPMA code: a full
    ``qkv.bias``, ``patch_embed.proj.1``) or ``videomae`` (VideoMAE's names, which ours are)."""
    keys = list(state)
    if any("attention.attention." in k or k.startswith("videomae.") for k in keys):
        return "hf"
    if any(k.endswith("attn.qkv.bias") or "patch_embed.proj.1." in k for k in keys):
        return "omnivision"
    return "videomae"


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _from_omnivision(state: dict) -> dict:
    """Released PPMA names -> ours: ``Sequential(PadIm2Video, Conv3d)`` is ``patch_embed.proj.1``;
    the full ``qkv.bias`` splits into ``q_bias`` and ``v_bias`` (the k part adds the same amount to
    every logit of a query row, so the softmax cancels it); the trunk's ``norm`` is the pooled
    feature's ``fc_norm`` in a classifier (no decoder in the file), the encoder's ``norm`` in MAE."""
    is_mae = any(".decoder." in f".{k}" or k.endswith("mask_token") for k in state)
    out = {}
    for key, value in state.items():
        k = _strip(key).replace("patch_embed.proj.1.", "patch_embed.proj.")
        if k.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[k[: -len("qkv.bias")] + "q_bias"] = q
            out[k[: -len("qkv.bias")] + "v_bias"] = v
            continue
        if k.startswith("norm.") and not is_mae:
            k = "fc_norm." + k[len("norm."):]
        out[k] = value
    return out


_HF_LAYER = re.compile(r"^(?:videomae\.)?encoder\.layer\.(\d+)\.(.+)$")


def _from_hf(state: dict) -> dict:
    """transformers' VideoMAE names -> ours (the decoder, mask token and classifier keep names the
    transfer rule drops)."""
    out, qkv = {}, {}
    for key, value in state.items():
        m = _HF_LAYER.match(key)
        if m is None:
            k = re.sub(r"^(videomae\.)?embeddings\.patch_embeddings\.projection\.", "patch_embed.proj.", key)
            k = re.sub(r"^(videomae\.)?layernorm\.", "norm.", k)
            k = re.sub(r"^classifier\.", "head.", k)
            out[k] = value
            continue
        i, rest = m.groups()
        if rest.startswith("attention.attention."):
            part = rest[len("attention.attention."):]
            if part in ("q_bias", "query.bias"):
                out[f"blocks.{i}.attn.q_bias"] = value
            elif part in ("v_bias", "value.bias"):
                out[f"blocks.{i}.attn.v_bias"] = value
            elif part in ("query.weight", "key.weight", "value.weight"):
                qkv.setdefault(i, {})[part.split(".")[0]] = value
            else:
                out[f"blocks.{i}.attn.{part}"] = value  # unknown: reported as unexpected
            continue
        for ours, theirs in HF_BLOCK.items():
            if rest.startswith(theirs + "."):
                out[f"blocks.{i}.{ours}{rest[len(theirs):]}"] = value
                break
        else:
            out[f"blocks.{i}.{rest}"] = value
    for i, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"hf layout: block {i} has only {sorted(parts)} of query/key/value weights")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def canonical_trunk(state: dict[str, torch.Tensor], keep_final_norm: bool = False) -> tuple[dict, list[str]]:
    """-> (trunk tensors under classifier names, keys dropped by the transfer rule)."""
    layout = detect_layout(state)
    if layout == "omnivision":
        state = _from_omnivision(state)
    elif layout == "hf":
        state = _from_hf(state)
    out, dropped = {}, []
    for key, value in state.items():
        k = _strip(key)
        if k == "pos_embed" and not is_sinusoid(value):
            out[k] = value  # a learned table: dropping it would silently change the model; no place for it
            continue
        if k.startswith(NOT_TRUNK) or (k.startswith(("norm.", "fc_norm.")) and not keep_final_norm):
            dropped.append(key)
            continue
        out[k] = value
    return out, dropped


def is_sinusoid(pos_embed: torch.Tensor) -> bool:
    """Whether a checkpoint's ``pos_embed`` is the fixed sinusoid table our models add (the released
    PPMA config's ``learnable_pos_embed: False`` saves it as a buffer; VideoMAE's default does not
    save it), so dropping it loses nothing. The tolerance admits a table stored in bf16 or fp16; a
    learned table (``learnable_pos_embed`` / ``use_learnable_pos_emb``) is far from it."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        return False
    table = sinusoid_table(pos_embed.shape[1], pos_embed.shape[2])
    return torch.allclose(pos_embed.float(), table, rtol=0, atol=5e-3)


def load_trunk(model: nn.Module, source: str | os.PathLike | dict, strict: bool = True,
               keep_final_norm: bool = False) -> TransferReport:
    """Load the trunk of ``source`` (any layout above, a path or a state dict) into ``model``.

    ``model`` is a ``VideoClassifier`` or a ``PretrainVideoMAE`` (whose trunk is ``encoder``).
    ``strict=True``: a trunk tensor the model needs that ``source`` does not give, or a trunk tensor
    of ``source`` the model has no place for, raises ``CheckpointError`` naming them and the layout;
    ``strict=False`` loads what fits and reports the rest. A shape mismatch always raises.
    ``keep_final_norm`` keeps ``norm`` / ``fc_norm`` (for weight averaging, which averages them too).
    """
    report, target, tensors = match_trunk(model, source, strict, keep_final_norm)
    target.load_state_dict(tensors, strict=False)
    return report


def match_trunk(model: nn.Module, source: str | os.PathLike | dict, strict: bool = True,
                keep_final_norm: bool = False) -> tuple[TransferReport, nn.Module, dict]:
    """``load_trunk`` without the load: (report, the module to load into, its tensors). Works on a
    model built on the meta device, so a job checks a checkpoint before it starts anything."""
    where = "the state dict" if isinstance(source, dict) else str(weights_file(source))
    state = read_state_dict(source)
    layout = detect_layout(state)
    trunk, dropped = canonical_trunk(state, keep_final_norm)
    target = model.encoder if isinstance(model, PretrainVideoMAE) else model
    own = {k: v for k, v in target.state_dict().items() if not k.startswith("heads.")}
    report = TransferReport(layout=layout, dropped=dropped)
    to_load = {}
    for k, v in trunk.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        if own[k].shape != v.shape:
            raise CheckpointError(f"{where}: shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model "
                                  f"{tuple(own[k].shape)}{_explain(k, v.shape, own[k].shape)}")
        to_load[k] = v
    report.loaded = sorted(to_load)
    reinit = () if keep_final_norm else ("norm.", "fc_norm.")  # re-initialised by the transfer rule
    report.missing = sorted(k for k in set(own) - set(to_load) if not k.startswith(reinit))
    if strict and (report.missing or report.unexpected):
        parts = []
        if report.missing:
            parts.append(f"{len(report.missing)} tensor(s) the model needs are not in it: {_few(report.missing)}")
        if report.unexpected:
            parts.append(f"{len(report.unexpected)} trunk tensor(s) have no place in the model: {_few(report.unexpected)}")
        if "pos_embed" in report.unexpected:
            parts.append("its pos_embed is a learned position table, and this model adds the fixed sinusoid one")
        raise CheckpointError(f"{where} ({layout} layout): {'; '.join(parts)}. Load it partially only on purpose "
                              f"(strict=False; the jobs' --init-from-partial)")
    return report, target, to_load


def load_trunks(sources: list) -> list[dict[str, torch.Tensor]]:
    """Canonical trunk tensors (final norm kept) of each checkpoint path or state dict, for weight
    averaging; an ensemble file gives all of its models, in their order."""
    trunks = [canonical_trunk(s, keep_final_norm=True)[0] for src in sources for s in read_checkpoint(src)]
    keys = set(trunks[0])
    for i, t in enumerate(trunks[1:], start=1):
        if set(t) != keys:
            raise CheckpointError(f"model {i} has other trunk tensors than model 0: {_few(sorted(set(t) ^ keys))}")
    return trunks


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _explain(key: str, got, want) -> str:
    if key == "patch_embed.proj.weight" and len(got) == 5:
        return (f" (tubelet x patch size {tuple(got[2:])} vs {tuple(want[2:])}, "
                f"input channels {got[1]} vs {want[1]})")
    if got[-1] != want[-1] or got[0] != want[0]:
        return f" (embedding width {got[0]} vs {want[0]}: a different model size)"
    return ""
