"""Ray Train overhead: the training step of ``ppma_ray.train.step.train_step`` timed in a plain
PyTorch loop and inside a Ray Train worker.

    python benchmarks/train_throughput.py [--model vit_tiny --img-size 64 --num-frames 16 --batch 8 --steps 30]

Both time the function every stage trains with (uint8 batch -> device -> normalize -> autocast ->
MAE loss -> backward -> grad-norm clipping -> finite check -> AdamW with the warmup + cosine LR and
per-step reseeding, as the worker does) on the same in-memory batch, so only the framework around it
differs. Prints clips/s of both and the ratio (target: Ray overhead <= 5%, i.e. ratio >= 0.95); on
CUDA also the MFU (bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppma_ray.config import ClipConfig, DecodeConfig, OptimConfig  # noqa: E402
from ppma_ray.models import create_model, flops  # noqa: E402
from ppma_ray.train.checkpoint import step_seed  # noqa: E402
from ppma_ray.train.loop import wrap_ddp  # noqa: E402
from ppma_ray.train.optim import build_optimizer, lr_at  # noqa: E402
from ppma_ray.train.stages import mae_loss  # noqa: E402
from ppma_ray.train.step import WorkerContext, train_step  # noqa: E402


def run_steps(args: dict, in_ray: bool = False) -> dict:
    """Warm up, then time ``steps`` training steps; returns clips/s and forward FLOPs per clip."""
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    clip = ClipConfig(num_frames=args["num_frames"], img_size=args["img_size"], short_side=args["img_size"])
    if in_ray:  # the same device choice and DDP wrapping as the real worker
        import ray.train
        import ray.train.torch

        c = ray.train.get_context()
        ctx = WorkerContext(c.get_world_rank(), c.get_world_size(), ray.train.torch.get_device(), clip, DecodeConfig())
    else:
        ctx = WorkerContext(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), clip, DecodeConfig())
    inner = create_model(args["model"], "mae", img_size=args["img_size"], num_frames=args["num_frames"]).to(ctx.device)
    model = wrap_ddp(inner, ctx)
    optim = OptimConfig(lr=1e-4, clip_grad=args["clip_grad"])
    opt = build_optimizer(inner, optim)
    params = [p for p in inner.parameters() if p.requires_grad]
    video = torch.randint(0, 255, (args["batch"], args["num_frames"], args["img_size"], args["img_size"], 3), dtype=torch.uint8)
    total = 3 + args["steps"]

    def step(i: int) -> None:
        torch.manual_seed(step_seed(0, ctx.rank, i))
        train_step(ctx, model, mae_loss, opt, params, {"video": video}, lr_at(i, total, optim), optim.clip_grad)

    for i in range(3):
        step(i)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(3, total):
        step(i)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"clips_per_s": args["steps"] * args["batch"] / elapsed, "flops": flops(inner), "device": str(ctx.device)}


def _ray_worker(config: dict) -> None:
    import tempfile

    import ray.train

    metrics = run_steps(config, in_ray=True)
    with tempfile.TemporaryDirectory() as d:  # Ray keeps a result's metrics with its checkpoint
        Path(d, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clip-grad", type=float, default=1.0, help="gradient clipping inside the step (0: off)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    args = {"model": a.model, "img_size": a.img_size, "num_frames": a.num_frames, "batch": a.batch, "steps": a.steps,
            "threads": a.threads, "clip_grad": a.clip_grad or None}

    plain = run_steps(args)

    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ppma_ray.ray_env import init_ray

    init_ray(verbose=False, log_to_driver=False)  # the console is for the figures
    gpu = torch.cuda.is_available()
    trainer = TorchTrainer(_ray_worker, train_loop_config=args,
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="bench"))
    in_ray = trainer.fit().metrics
    ratio = in_ray["clips_per_s"] / plain["clips_per_s"]
    out = {"plain_clips_per_s": plain["clips_per_s"], "ray_clips_per_s": in_ray["clips_per_s"], "ray_over_plain": ratio,
           "device": plain["device"], **args}
    print(f"{a.model} {a.num_frames}x{a.img_size}^2 batch {a.batch} on {plain['device']}, train_step with clipping "
          f"{args['clip_grad']}, LR schedule and finite check")
    print(f"  plain PyTorch {plain['clips_per_s']:.2f} clips/s   Ray Train {in_ray['clips_per_s']:.2f} clips/s   ratio {ratio:.3f}")
    if gpu:
        mfu = 3 * plain["flops"] * in_ray["clips_per_s"] / (a.peak_tflops * 1e12)
        out["ray_mae_mfu"] = mfu
        print(f"  MAE MFU in Ray Train (bf16): {mfu:.1%}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
