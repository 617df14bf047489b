"""Weight-space averaging of K checkpoints that share an initialisation (PPMA §6).

* Fixed: theta = sum_k alpha_k * theta_k over every trunk tensor, the final norm included; heads
  are not averaged (a downstream task trains its own).
* Learned: alpha = softmax(w), ``w`` initialised to ones (alpha uniform), one set of logits for the
  whole trunk or one per parameter tensor. Every forward rebuilds theta(alpha) and runs the
  classifier functionally with it (``torch.func.functional_call``), so the gradient reaches alpha
  through the network; only the logits and the head train.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ppma_ray.models.errors import CheckpointError
from ppma_ray.models.heads import VideoClassifier


def average_state_dicts(trunks: list[dict[str, torch.Tensor]], alphas) -> dict[str, torch.Tensor]:
    """theta = sum_k alphas[k] * trunks[k] (alphas need not sum to 1, but usually do)."""
    if len(alphas) != len(trunks):
        raise ValueError(f"{len(trunks)} checkpoints but {len(alphas)} coefficients")
    out = {}
    for key in trunks[0]:
        ref = trunks[0][key]
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for a, t in zip(alphas, trunks):
            acc += float(a) * t[key].double()
        out[key] = acc.to(ref.dtype)
    return out


def _to_classifier_names(trunk: dict, model: VideoClassifier) -> dict:
    """The trunk tensors the classifier has: an MAE encoder's final ``norm`` has no counterpart (a
    classifier's ``norm`` is Identity); a stage-2 checkpoint's ``fc_norm`` is kept and averaged. Any
    other tensor without a place (a learned ``pos_embed``) is an error, not left out."""
    own = set(model.state_dict())
    if extra := sorted(k for k in trunk if k not in own and not k.startswith("norm.")):
        raise CheckpointError(f"the averaged checkpoints have trunk tensors the model has no place for: {', '.join(extra[:6])}")
    return {k: v for k, v in trunk.items() if k in own}


class LearnedAverage(nn.Module):
    """Classifier whose trunk is the softmax(w)-weighted average of K frozen trunks.

    ``forward(video, head=None)`` as ``VideoClassifier``. ``per_layer`` gives one coefficient set
    per parameter tensor (``learned_average_layer_softmax``)."""

    def __init__(self, classifier: VideoClassifier, trunks: list[dict[str, torch.Tensor]], per_layer: bool = False):
        super().__init__()
        self.classifier = classifier
        names = sorted(_to_classifier_names(trunks[0], classifier))
        self.names = [n for n in names if trunks[0][n].is_floating_point()]
        for k, t in enumerate(trunks):  # frozen constants that move with the module
            for i, n in enumerate(self.names):
                self.register_buffer(f"theta_{k}_{i}", t[n].detach().clone(), persistent=False)
        self.num_models = len(trunks)
        rows = len(self.names) if per_layer else 1
        self.mix_logits = nn.Parameter(torch.ones(rows, self.num_models))
        for name, p in classifier.named_parameters():  # only the heads (and the logits) train
            p.requires_grad_(name.startswith("heads."))
        self.cfg = classifier.cfg
        self.train(self.training)

    def alphas(self) -> torch.Tensor:
        """(rows, K) mixing coefficients on the simplex."""
        return self.mix_logits.softmax(dim=-1)

    def mixed_params(self) -> dict[str, torch.Tensor]:
        a = self.alphas()
        out = {}
        for i, n in enumerate(self.names):
            row = a[i] if a.shape[0] > 1 else a[0]
            out[n] = sum(row[k] * getattr(self, f"theta_{k}_{i}") for k in range(self.num_models))
        return out

    def forward(self, video: torch.Tensor, head: str | None = None):
        # parameters not given (the heads) come from the classifier itself
        return functional_call(self.classifier, self.mixed_params(), (video,), {"head": head}, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        for name, module in self.classifier.named_children():  # trunk frozen: always eval mode
            module.train(mode and name == "heads")
        return self

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()
