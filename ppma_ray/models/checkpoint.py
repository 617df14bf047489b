"""Move trunk weights between stages: MAE -> classifier -> classifier, and public VideoMAE files.

Keys are first brought to one canonical form, the classifier's trunk names (``patch_embed.*``,
``blocks.N.*``, ``norm.*``, ``fc_norm.*``): wrappers (``model`` / ``module`` / ``state_dict``) and
prefixes (DDP ``module.``, VideoMAE ``encoder.``, omnivision ``trunk.``) are removed. Then the
method's transfer rule (PPMA §4.1, §5.1) drops the decoder, the mask token, the heads and the final
norm (``norm`` of an MAE encoder, ``fc_norm`` of a classifier): the pooled-feature ``fc_norm`` is
re-initialised at every transfer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn

from ppma_ray.models.mae import PretrainVideoMAE

NOT_TRUNK = ("decoder.", "encoder_to_decoder.", "mask_token", "decoder_pos_embed", "heads.", "head.", "pos_embed")
PREFIXES = ("module.", "trunk.", "_orig_mod.", "encoder.")


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not given
    unexpected: list[str] = field(default_factory=list)  # given, not used (and not dropped by rule)
    dropped: list[str] = field(default_factory=list)  # removed by the transfer rule

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; dropped by rule {len(self.dropped)}; "
                f"missing {self.missing}; unexpected {self.unexpected}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``.safetensors`` or a ``.pth``/``.pt`` file without executing code (weights_only)."""
    path = str(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap(obj)


def unwrap(obj) -> dict[str, torch.Tensor]:
    """Find the state dict inside the usual checkpoint wrappers."""
    for key in ("model", "module", "state_dict", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return unwrap(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("no state dict of tensors found in the checkpoint")
    return obj


def canonical_trunk(state: dict[str, torch.Tensor], keep_final_norm: bool = False) -> tuple[dict, list[str]]:
    """-> (trunk tensors under classifier names, keys dropped by the transfer rule)."""
    out, dropped = {}, []
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k.startswith(NOT_TRUNK) or (k.startswith(("norm.", "fc_norm.")) and not keep_final_norm):
            dropped.append(key)
            continue
        out[k] = value
    return out, dropped


def load_trunk(model: nn.Module, source: str | os.PathLike | dict, keep_final_norm: bool = False) -> TransferReport:
    """Load the trunk of ``source`` (a path or a state dict from any stage) into ``model``.

    ``model`` is a ``VideoClassifier`` or a ``PretrainVideoMAE`` (whose trunk is ``encoder``).
    ``keep_final_norm`` keeps ``norm`` / ``fc_norm`` (for weight averaging, which averages them too).
    Raises ``ValueError`` naming the cause when shapes do not match.
    """
    state = read_state_dict(source) if not isinstance(source, dict) else unwrap(source)
    trunk, dropped = canonical_trunk(state, keep_final_norm)
    target = model.encoder if isinstance(model, PretrainVideoMAE) else model
    own = {k: v for k, v in target.state_dict().items() if not k.startswith("heads.")}
    report = TransferReport(dropped=dropped)
    to_load = {}
    for k, v in trunk.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        if own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                             f"{_explain(k, v.shape, own[k].shape)}")
        to_load[k] = v
    report.loaded = sorted(to_load)
    report.missing = sorted(set(own) - set(to_load))
    target.load_state_dict(to_load, strict=False)
    return report


def _explain(key: str, got, want) -> str:
    if key == "patch_embed.proj.weight" and len(got) == 5:
        return (f" (tubelet x patch size {tuple(got[2:])} vs {tuple(want[2:])}, "
                f"input channels {got[1]} vs {want[1]})")
    if got[-1] != want[-1] or got[0] != want[0]:
        return f" (embedding width {got[0]} vs {want[0]}: a different model size)"
    return ""
