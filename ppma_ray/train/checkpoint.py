"""Run checkpoints: ``model.safetensors`` + ``train_state.pt`` + ``config.json``.

``train_state.pt`` holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: optimizer state, step, epoch, step within the epoch (the data
plan cursor), the seed, and the loss so far. Randomness needs no saved generator state: every
step reseeds from (seed, rank, step), so a resumed step draws exactly what it would have drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "train_state.pt", "config.json"
# written beside them by the training loop: the videos rejected so far, and counts per source
REJECTS_FILE, FAILURES_FILE = "rejects.csv", "data_failures.json"


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, config: dict) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(d / MODEL_FILE), metadata={"format": "pt"})
    full = dict(state)
    if optimizer is not None:
        full["optimizer"] = optimizer.state_dict()
    torch.save(full, d / STATE_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return d


def read_train_state(directory: str | Path) -> dict:
    """``train_state.pt`` on the host, whatever device its tensors were saved from: a GPU worker's
    optimizer state is CUDA tensors, and the driver (often a CPU-only head node) reads it too."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model (and optimizer, whose state follows its parameters' device) in place; returns
    the train state (without the optimizer)."""
    d = Path(directory)
    model.load_state_dict(load_file(str(d / MODEL_FILE)))
    state = read_train_state(d)
    opt_state = state.pop("optimizer", None)
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return state


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's step (masks, drop-path, mixup, erasing)."""
    return (seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1)
