"""Weights from the Hugging Face Hub: ``hf://ORG/NAME[@REVISION]`` (optional extra ``hf``).

The repository is fetched with ``huggingface_hub.snapshot_download`` (only its config and weight
files), through the Hub's own cache: a second run, or another process on the same node, reads the
cache. Each node fetches for itself, so no shared filesystem is needed. ``HF_HUB_OFFLINE=1`` reads the
cache only; ``HF_TOKEN`` gives access to private repositories.
"""

from __future__ import annotations

from pathlib import Path

from ppma_ray.errors import one_line
from ppma_ray.models.errors import CheckpointError

PREFIX = "hf://"
# what a transformers model folder needs here: its config and its weights, never the rest of a repo
PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]


def is_hub(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(uri: str) -> tuple[str, str | None]:
    """``hf://ORG/NAME[@REVISION]`` -> (repo id, revision or None)."""
    repo, _, revision = uri[len(PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{uri}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return repo, revision or None


def snapshot(uri: str) -> Path:
    """The local folder of ``uri``'s files, fetched into the Hub cache if not there yet."""
    repo, revision = parse(uri)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{uri}: hf:// needs huggingface_hub (pip install -e '.[hf]')") from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=PATTERNS))
    except Exception as e:  # not found, no access, offline without a cached copy: say which
        raise CheckpointError(f"{uri}: cannot be fetched from the Hugging Face Hub ({one_line(e, 300)})") from None
