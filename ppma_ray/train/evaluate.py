"""Multi-view testing (PPMA §5.2): views per video, softmax averaged per video, top-1 and top-5.

Every validation video is evaluated exactly once across ranks; a video that cannot be decoded is
excluded and reported by its row id, never replaced by another clip.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ppma_ray.data.pipeline import Source
from ppma_ray.train.data import eval_stream
from ppma_ray.train.stages import to_model_input
from ppma_ray.train.step import WorkerContext


def video_probs(logits: torch.Tensor) -> torch.Tensor:
    """logits: (B, V, C) for V views of each video -> (B, C), the mean of the views' softmaxes."""
    return logits.float().softmax(dim=-1).mean(dim=1)


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, probs.shape[-1])
    return int((probs.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum())


@torch.no_grad()
def multiview_test(model, source: Source, ctx: WorkerContext, head: str | None = None, num_clips: int = 2,
                   num_crops: int = 3, batch_size: int = 4) -> dict:
    """-> ``{"top1", "top5", "videos", "failed", "failed_rows", "decoded_by_pyav"}`` over the whole
    list (all ranks); ``decoded_by_pyav``: videos decord could not decode that ``auto`` gave to PyAV."""
    model.eval()
    counts = torch.zeros(5, dtype=torch.float64)  # top-1 hits, top-5 hits, evaluated, failed, decoded by PyAV
    failed_rows: list[int] = []
    for batch in eval_stream(source, ctx.clip, ctx.decode, ctx.world, ctx.rank, num_clips, num_crops, batch_size):
        ok = batch["ok"].bool()
        failed_rows += batch["row"][~ok].tolist()
        counts[3] += int((~ok).sum())
        counts[4] += int((batch["fallback"].bool() & ok).sum())
        if not ok.any():
            continue
        video = batch["video"][ok].to(ctx.device)  # (b, V, T, H, W, C)
        b, v = video.shape[:2]
        with ctx.autocast():
            logits = model(to_model_input(video.flatten(0, 1)), head=head)
        probs = video_probs(logits.reshape(b, v, -1))
        labels = batch["label"][ok].to(probs.device)
        counts[0] += topk_correct(probs, labels, 1)
        counts[1] += topk_correct(probs, labels, 5)
        counts[2] += b
    if ctx.world > 1:
        counts = counts.to(ctx.device)
        dist.all_reduce(counts)
        counts = counts.cpu()
        gathered: list = [None] * ctx.world
        dist.all_gather_object(gathered, failed_rows)
        failed_rows = sorted(r for part in gathered for r in part)
    n = max(1.0, float(counts[2]))
    return {"top1": float(counts[0]) / n, "top5": float(counts[1]) / n, "videos": int(counts[2]),
            "failed": int(counts[3]), "failed_rows": sorted(failed_rows), "decoded_by_pyav": int(counts[4])}
