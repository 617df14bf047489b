"""Linear probing on cached features: extract once with Ray Data batch inference, then train the head.

The trunk is frozen in a linear probe, so its features never change: extracting them once (every
test view of every video) and training ``Linear(D -> C)`` on the cached vectors gives the same
probe as the Ray Train loop at a fraction of the cost, which makes sweeps (tasks x checkpoints x
learning rates) cheap. Test scoring follows the protocol: softmax per view, averaged per video.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import ray
import torch
import torch.nn.functional as F

from ppma_ray.data.config import ClipConfig, DecodeConfig
from ppma_ray.data.pipeline import Source, build_eval_dataset, plan_to_table
from ppma_ray.models.checkpoint import load_trunk
from ppma_ray.models.heads import VideoClassifier
from ppma_ray.models.config import ViTConfig
from ppma_ray.ray_env import reserved_device
from ppma_ray.train.evaluate import topk_correct, video_probs
from ppma_ray.train.stages import to_model_input


class FeatureExtractor:
    """Decoded views ``(n, V, T, H, W, C)`` -> pooled features ``(n, V, D)``: a Ray Data actor on a
    GPU it reserved (bf16 autocast), or held per process by ``extract_batch`` on CPUs."""

    def __init__(self, cfg: dict, weights_ref):
        self.device = reserved_device()
        self.model = VideoClassifier(ViTConfig(**{**cfg, "head_names": tuple(cfg["head_names"])}), num_classes=1)
        with warnings.catch_warnings():
            # torch 2.4 and 2.5 warn at every tensor unpickled in a process (``torch.load`` without
            # weights_only, inside torch's own unpickler), and so printed one FutureWarning per decode
            # process in each evaluation; these are the driver's weights, put in the object store by it
            warnings.filterwarnings("ignore", "You are using `torch.load` with `weights_only=False`", FutureWarning)
            weights = ray.get(weights_ref) if weights_ref is not None else None
        if weights is not None:
            load_trunk(self.model, weights)  # the method's transfer rule: fc_norm re-initialised
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        video = torch.from_numpy(batch["video"])
        n, v = video.shape[:2]
        feats = np.zeros((n, v, self.model.embed_dim), dtype=np.float32)
        ok = batch["ok"].astype(bool)
        if ok.any():
            x = to_model_input(video[ok].flatten(0, 1).to(self.device))
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
            with autocast:
                f = self.model.features(x)
            feats[ok] = f.reshape(int(ok.sum()), v, -1).float().cpu().numpy()
        return {"features": feats, "label": batch["label"], "source": batch["source"], "row": batch["row"],
                "ok": batch["ok"], "fallback": batch["fallback"]}


_HELD: dict = {}  # this process's FeatureExtractor, reused by the CPU tasks of one extraction


def extract_batch(batch: dict, cfg: dict, weights_ref) -> dict:
    """``map_batches`` task on CPUs: the extractor is built once per worker process and reused by
    the following batches (Ray reuses task processes), so no extra actor process is started."""
    key = (weights_ref.hex() if weights_ref is not None else None, repr(cfg))
    if key not in _HELD:
        _HELD.clear()
        _HELD[key] = FeatureExtractor(cfg, weights_ref)
    return _HELD[key](batch)


def extract_features(model_cfg: ViTConfig, weights: dict | None, sources: list[Source], clip: ClipConfig,
                     num_clips: int, num_crops: int, decode: DecodeConfig, num_gpus: int | None = None) -> list[dict]:
    """Features of every row of each source, in one pass:
    ``[{"features": (N, V, D), "label": (N,), "failed_rows", "decoded_by_pyav"}, ...]``; rows that
    cannot be decoded are dropped and listed; ``decoded_by_pyav`` counts the rows decord could not
    decode that ``auto`` gave to PyAV.

    With GPUs in the cluster (``num_gpus``, default: the cluster's), a pool of 1 to ``num_gpus`` actors
    that each reserve one GPU (as they come free of trainers); otherwise CPU tasks fused with the decode. Either way the model runs only
    where Ray reserved the resources for it."""
    plan = np.concatenate([np.stack([np.full(s.table.num_rows, k, dtype=np.int64),
                                     np.arange(s.table.num_rows, dtype=np.int64)], 1) for k, s in enumerate(sources)])
    table = plan_to_table(sources, plan)
    ds = build_eval_dataset(table, clip, decode, num_clips, num_crops)
    ref = ray.put(weights) if weights is not None else None
    kwargs = {"cfg": model_cfg.to_dict(), "weights_ref": ref}
    gpus = int(ray.cluster_resources().get("GPU", 0)) if num_gpus is None else num_gpus
    if gpus:
        ds = ds.map_batches(FeatureExtractor, fn_constructor_kwargs=kwargs, batch_size=8, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=gpus), num_gpus=1)
    else:
        # fused into the decode tasks; the model sees 4 videos at a time (24 clips at 2 x 3 views),
        # however many a task decodes, so its activations stay small on every CPU at once
        ds = ds.map_batches(extract_batch, fn_kwargs=kwargs, batch_size=4, batch_format="numpy",
                            num_cpus=decode.num_cpus_per_task)
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    cat = {key: np.concatenate([p[key] for p in parts]) for key in ("features", "label", "source", "row", "ok", "fallback")}
    out = []
    for k in range(len(sources)):
        mine = cat["source"] == k
        ok, bad = mine & cat["ok"].astype(bool), mine & ~cat["ok"].astype(bool)
        out.append({"features": cat["features"][ok], "label": cat["label"][ok], "failed_rows": cat["row"][bad].tolist(),
                    "decoded_by_pyav": int(cat["fallback"][ok].sum())})
    return out


def fit_linear_head(features: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 100,
                    lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> torch.nn.Linear:
    """Full-batch AdamW on every view as a sample (features: (N, V, D)), cosine LR."""
    torch.manual_seed(seed)
    x = torch.from_numpy(features).flatten(0, 1)
    y = torch.from_numpy(np.repeat(labels, features.shape[1]))
    head = torch.nn.Linear(x.shape[-1], num_classes)
    torch.nn.init.normal_(head.weight, std=0.01)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW([{"params": [head.weight], "weight_decay": weight_decay},
                             {"params": [head.bias], "weight_decay": 0.0}], lr=lr)
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


@torch.no_grad()
def score_head(head: torch.nn.Linear, features: np.ndarray, labels: np.ndarray) -> dict:
    """Multi-view protocol on cached test features (N, V, D) -> top-1 / top-5."""
    x = torch.from_numpy(features)
    probs = video_probs(head(x))
    y = torch.from_numpy(labels)
    n = max(1, len(labels))
    return {"top1": topk_correct(probs, y, 1) / n, "top5": topk_correct(probs, y, 5) / n, "videos": len(labels)}


def trunk_weights(model_cfg: ViTConfig, weights: dict | None, seed: int) -> dict:
    """The weights every extractor process loads: ``weights``, or for a random-init trunk one seeded
    draw made here. Left to themselves, the processes would each draw their own random trunk, and
    the probe would mix features of different networks (a different score every run)."""
    if weights is not None:
        return weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VideoClassifier(model_cfg, num_classes=1).state_dict()


def linear_probe_cached(model_cfg: ViTConfig, weights: dict | None, train: Source, test: Source, num_classes: int,
                        clip: ClipConfig, decode: DecodeConfig, num_clips: int = 2, num_crops: int = 3,
                        epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    weights = trunk_weights(model_cfg, weights, seed)
    tr, te = extract_features(model_cfg, weights, [train, test], clip, num_clips, num_crops, decode)
    head = fit_linear_head(tr["features"], tr["label"], num_classes, epochs, lr, weight_decay, seed)
    result = score_head(head, te["features"], te["label"])
    result.update(failed=len(te["failed_rows"]), failed_rows=te["failed_rows"], train_failed=len(tr["failed_rows"]),
                  wall_s=time.perf_counter() - t0)
    if te["failed_rows"]:
        print(f"WARNING: {len(te['failed_rows'])} test videos of {test.name} could not be decoded and were excluded "
              f"(rows {te['failed_rows'][:20]})", flush=True)
    if pyav := {name: part["decoded_by_pyav"] for name, part in (("train", tr), ("test", te)) if part["decoded_by_pyav"]}:
        print(f"note: videos of {test.name} decord could not decode were decoded with PyAV (data.decode.backend auto): "
              + ", ".join(f"{n} {name}" for name, n in pyav.items()), flush=True)
    return result
